"""Real clients for the end-to-end walk-through: a JupyterHub user and a kernel over WebSocket."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

import httpx
import websocket


class HubUser:
    """A person using JupyterHub through its login form and REST API, as a browser would."""

    def __init__(self, hub_url: str, username: str, password: str) -> None:
        self.hub_url = hub_url
        self.username = username
        self.password = password
        self.http = httpx.Client(base_url=hub_url, follow_redirects=True, timeout=30)
        self.token: str | None = None

    def login(self) -> httpx.Response:
        """Submit the login form; return the final response after redirects."""
        self.http.get("/hub/login")
        xsrf = self.http.cookies.get("_xsrf", "")
        return self.http.post(
            "/hub/login", data={"username": self.username, "password": self.password, "_xsrf": xsrf}
        )

    def create_token(self) -> str:
        """Create an API token for this user with the session cookie, as the token page does."""
        xsrf = self.http.cookies.get("_xsrf", "")
        response = self.http.post(
            f"/hub/api/users/{self.username}/tokens",
            json={"note": "end-to-end test", "expires_in": 3600},
            headers={"X-XSRFToken": xsrf},
        )
        response.raise_for_status()
        self.token = response.json()["token"]
        return self.token

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"}

    def start_server(self, timeout: float = 90) -> httpx.Response:
        """Ask the hub to spawn this user's server and wait until it is ready, or return the refusal."""
        response = self.http.post(f"/hub/api/users/{self.username}/server", headers=self.auth)
        if response.status_code >= 400:
            return response
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            model = self.http.get(f"/hub/api/users/{self.username}", headers=self.auth).json()
            server = model.get("servers", {}).get("", {})
            if server.get("ready"):
                return response
            time.sleep(0.5)
        raise TimeoutError(f"server of {self.username} not ready after {timeout} s")

    def start_kernel(self, kernel_name: str = "regsandbox") -> "Kernel":
        response = self.http.post(
            f"/user/{self.username}/api/kernels", json={"name": kernel_name}, headers=self.auth
        )
        response.raise_for_status()
        kernel_id = response.json()["id"]
        ws_url = self.hub_url.replace("http://", "ws://") + f"/user/{self.username}/api/kernels/{kernel_id}/channels"
        return Kernel(websocket.create_connection(ws_url, header=[f"Authorization: token {self.token}"], timeout=120))


@dataclass
class ExecutionResult:
    stdout: str = ""
    results: list[str] = field(default_factory=list)
    error_name: str | None = None
    error_value: str | None = None


class Kernel:
    """A kernel of a single-user server, driven over the Jupyter messaging protocol."""

    def __init__(self, connection: websocket.WebSocket) -> None:
        self.connection = connection
        self.session = uuid.uuid4().hex

    def execute(self, code: str, timeout: float = 180) -> ExecutionResult:
        """Run ``code`` and collect its output until the kernel is idle again."""
        msg_id = uuid.uuid4().hex
        self.connection.send(json.dumps({
            "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "e2e",
                       "session": self.session, "date": "", "version": "5.3"},
            "parent_header": {}, "metadata": {}, "channel": "shell",
            "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                        "allow_stdin": False, "stop_on_error": True},
        }))
        result = ExecutionResult()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = json.loads(self.connection.recv())
            if message.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = message["msg_type"], message["content"]
            if kind == "stream":
                result.stdout += content["text"]
            elif kind in ("execute_result", "display_data"):
                result.results.append(content["data"].get("text/plain", ""))
            elif kind == "error":
                result.error_name, result.error_value = content["ename"], content["evalue"]
            elif kind == "status" and content["execution_state"] == "idle":
                return result
        raise TimeoutError(f"kernel did not finish within {timeout} s")

    def close(self) -> None:
        self.connection.close()
