# Two commands for a fresh machine: `make up` and `make test`. Both install first.
# The virtual environment is built from Debian's Python (not pyenv's, which lives under /root,
# mode 0700), so sandbox Unix users can execute the same interpreter.

SYSTEM_PYTHON ?= /usr/bin/python3.11
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: install up down status test lock browser

install: $(VENV)/.installed node_modules/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	@$(SYSTEM_PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { apt-get update -q && apt-get install -y -q python3.11-venv; }
	@test -x $(BIN)/python || $(SYSTEM_PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	$(BIN)/python -m regsandbox_kernel.install
	install -D -m 0644 sandbox_images/jupyterlab-overrides.json $(VENV)/share/jupyter/lab/settings/overrides.json
	@touch $@

node_modules/.installed: package.json package-lock.json
	@command -v npm >/dev/null || { apt-get update -q && apt-get install -y -q nodejs npm; }
	npm ci --no-audit --no-fund --loglevel=error
	@touch $@

# Headless Chromium and a CJK font for the console tests, from Debian's packages (never a
# downloaded browser build).
browser:
	@{ command -v chromium && fc-list :lang=zh | grep -q . ; } >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q chromium chromium-driver fonts-wqy-zenhei; }

up: install
	$(BIN)/regsandbox up

down:
	$(BIN)/regsandbox down

status:
	$(BIN)/regsandbox status

test: install browser
	$(BIN)/pytest $(PYTEST_ARGS)

# Re-pin every Python package after changing the dependencies in pyproject.toml.
lock:
	{ echo "# Exact versions installed by make install; regenerate with make lock."; \
	  $(BIN)/pip freeze --exclude-editable --disable-pip-version-check; } > requirements.lock
