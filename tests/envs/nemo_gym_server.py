"""A small NeMo-Gym-shaped resource server on loopback for the adapter tests: ``/seed_session`` opens a
cookie session, ``/get_letter`` is the tool, ``/verify`` scores the final message against the row's secret.
Both validate the request's ``response`` as NeMo-Gym's ``NeMoGymResponse`` does (its required fields, 422 else).
As a ``GymnasiumServer``: ``/reset`` opens a session and says how long the word is, ``/step`` reads the model's
message and answers a gymnasium step (reward 1 and terminated on the word, a hint otherwise, truncated after 3).
``mode`` breaks it on purpose: "verify_500", "verify_not_json", "verify_no_reward", "verify_hangs",
"step_bad_reward", "step_not_json"."""

from __future__ import annotations

import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOOL = {"type": "function", "name": "get_letter", "description": "One letter of the secret word.",
        "parameters": {"type": "object", "properties": {"index": {"type": "integer"}}, "required": ["index"]}}
ROWS = [{"responses_create_params": {"input": [{"role": "system", "content": "Answer with the word."},
                                               {"role": "user", "content": "Spell the secret word."}], "tools": [TOOL]},
         "secret": secret} for secret in ("cab", "dog")]


RESPONSE_FIELDS = ("id", "created_at", "model", "object", "output", "parallel_tool_calls", "tool_choice", "tools")
ITEM_FIELDS = {"message": ("id", "content", "role", "status", "type"), "function_call": ("arguments", "call_id", "name", "type"),
               "function_call_output": ("call_id", "output", "type")}


def missing_fields(response) -> list[str]:
    """What NeMo-Gym's NeMoGymResponse model (OpenAI's Response) would find missing in a request's ``response``."""
    missing = [f"response.{k}" for k in RESPONSE_FIELDS if k not in response]
    for i, item in enumerate(response.get("output") or []):
        missing += [f"response.output.{i}.{k}" for k in ITEM_FIELDS.get(item.get("type"), ()) if k not in item]
        if item.get("type") == "message":
            missing += [f"response.output.{i}.content.{j}.annotations" for j, part in enumerate(item.get("content") or [])
                        if "annotations" not in part]
    return missing


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        server = self.server
        if self.path == "/seed_session":
            sid = str(len(server.sessions))
            server.sessions[sid] = body["secret"]
            return self._answer(200, {}, cookie=f"session={sid}")
        if self.path == "/reset":
            sid = str(len(server.sessions))
            server.sessions[sid] = body["secret"]
            server.turns[sid] = 0
            return self._answer(200, {"observation": f"The word has {len(body['secret'])} letters.", "info": {}},
                                cookie=f"session={sid}")
        if self.path == "/step":
            return self._step(body)
        secret = server.sessions.get((self.headers.get("Cookie") or "").partition("session=")[2])
        if self.path == "/get_letter":
            if secret is None:
                return self._answer(400, {"detail": "no session: call /seed_session first"})
            if not isinstance(body.get("index"), int) or not 0 <= body["index"] < len(secret):
                return self._answer(422, {"detail": f"index: an integer in [0, {len(secret)}) is required"})
            return self._answer(200, {"letter": secret[body["index"]]})
        if self.path == "/verify":
            return self._verify(body)
        self._answer(404, {"detail": "Not Found"})

    def _step(self, body):
        server = self.server
        sid = (self.headers.get("Cookie") or "").partition("session=")[2]
        if sid not in server.sessions:
            return self._answer(400, {"detail": "no session: call /reset first"})
        if missing_fields(body.get("response") or {}):
            return self._answer(422, {"detail": [{"type": "missing", "loc": m} for m in missing_fields(body.get("response") or {})]})
        server.stepped.append(body)
        if server.mode == "step_not_json":
            return self._answer(200, "<html>oops</html>")
        secret, text = server.sessions[sid], body["response"]["output"][-1]["content"][0]["text"].strip()
        server.turns[sid] += 1
        if server.mode == "step_bad_reward":
            return self._answer(200, {"observation": "?", "reward": "high", "terminated": False, "truncated": False})
        if text == secret:
            return self._answer(200, {"observation": "right", "reward": 1.0, "terminated": True, "truncated": False,
                                      "info": {"success": True}})
        return self._answer(200, {"observation": f"no; it starts with {secret[0]}", "reward": 0.0, "terminated": False,
                                  "truncated": server.turns[sid] >= 3, "info": {}})

    def _verify(self, body):
        server = self.server
        server.verified.append(body)
        if missing_fields(body.get("response") or {}):
            return self._answer(422, {"detail": [{"type": "missing", "loc": m} for m in missing_fields(body.get("response") or {})]})
        if server.mode == "verify_500":
            return self._answer(500, {"detail": "judge crashed"})
        if server.mode == "verify_not_json":
            return self._answer(200, "<html>oops</html>")
        if server.mode == "verify_no_reward":
            return self._answer(200, {"score": 1})
        if server.mode == "verify_hangs":
            server.release.wait(30)
        answer = body["response"]["output"][-1]["content"][0]["text"].strip()
        self._answer(200, {**body, "reward": float(answer == body["secret"])})

    def _answer(self, status, payload, cookie=None):
        data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if cookie:
            self.send_header("Set-Cookie", cookie)
        self.end_headers()
        self.wfile.write(data)


@contextlib.contextmanager
def resource_server(mode: str = "ok"):
    """Serve on 127.0.0.1 at a free port in a thread; yields the server (``.url``, ``.verified`` bodies)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.mode, server.sessions, server.verified, server.release = mode, {}, [], threading.Event()
    server.turns, server.stepped = {}, []
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
