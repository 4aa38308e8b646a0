"""An OpenAI-compatible chat server on loopback with scripted answers, for the remote-teacher tests."""

import http.server
import json
import threading
import time


class ScriptedServer:
    """An OpenAI-compatible chat endpoint on 127.0.0.1 whose answers are scripted per target title:
    a list of actions consumed in order, the last one repeating."""

    def __init__(self, scripts):
        self.scripts = {title: list(actions) for title, actions in scripts.items()}
        self.requests: list[str] = []
        self.authorization: list[str] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"]
                # A reason prompt quotes the target title; a keyword prompt starts with the item's text.
                title = (next((t for t in server.scripts if f'"{t}"' in prompt), None)
                         or max((t for t in server.scripts if t in prompt), key=len))
                with server.lock:
                    server.requests.append(title)
                    server.authorization.append(self.headers.get("Authorization", ""))
                    actions = server.scripts[title]
                    action = actions.pop(0) if len(actions) > 1 else actions[0]
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self.respond(*action)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def respond(self, kind, value=None):
                if kind == "sleep":
                    time.sleep(value)
                    kind, value = "ok", "Yes. Late but fine."
                if kind == "status":
                    self.send_response(value)
                    self.end_headers()
                    self.wfile.write(b'{"error": "scripted"}')
                    return
                payload = value.encode() if kind == "raw" else json.dumps(
                    {"choices": [{"message": {"role": "assistant", "content": value}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
