"""JupyterHub configuration of regsandbox: sign-in, sandboxes and the sync with admin_api.

- :mod:`hub_config.jupyterhub_config`: the configuration file that ``jupyterhub -f`` loads.
- :mod:`hub_config.authenticator`: ``AdminApiAuthenticator``, which checks passwords and TOTP codes with admin_api.
- :mod:`hub_config.spawner`: ``InstitutionSpawner``, one Unix user per modeller in the group of their institution.
- :mod:`hub_config.user_sync`: the managed service that stops servers and removes hub users when admin_api changes.
- :mod:`hub_config.hubfiles`: files of the hub under the data directory and the ``regsandbox`` service token.
"""
