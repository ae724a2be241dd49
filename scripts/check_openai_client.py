#!/usr/bin/env python3
"""`mode serve` seen by the official `openai` Python client, then under load (`make serve-check`).

1. Sets up (once) a venv at $MODE_HOME/venvs/openai (MODE_HOME defaults to ~/.cache/mode) with
   the pinned client below, and reruns itself in it.
2. Starts `target/release/mode serve` on a free loopback port with the default backbone (the
   binary fetches it on first use).
3. Through the client: the model list, a completion, a chat completion, the same chat streamed
   (its deltas must join to the whole answer: greedy, temperature 0), the same chat with
   extra_body={"experts": []} (the backbone alone: the same answer again when no expert is
   loaded, else the answer of {"gate_top_k": 0}), and malformed requests
   that must raise openai.BadRequestError (among them a field the server does not implement,
   `logit_bias`); `stop` (the completion cut before a piece of its own text, finish_reason
   "stop"), `n=2` (two choices, indexed); the server runs with --api-key (through
   MODE_API_KEY), so a client with a wrong key must get openai.AuthenticationError (401);
   one chat completion through `curl` with the key.
4. Load: --clients threads (default 32) send small chat requests (--max-tokens, default 8) in a loop for
   --seconds (default 60); reports requests done, failures, p50/p95 latency, completion tokens
   per request, prompt tokens the server read (its /metrics: what its prompt cache did not hold),
   the CPU cores the server and the load generator itself used (both share the machine), and
   that the server is still alive and answering.

Exits non-zero on any failure. Not run by CI (it needs the real backbone and a minute or more).
"""

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

OPENAI_PIN = "openai==3.57.0"
ROOT = Path(__file__).resolve().parent.parent
# The key the server under test requires (given through MODE_API_KEY, as operators should).
API_KEY = "sk-check-" + secrets.token_hex(8)


def mode_home() -> Path:
    home = os.environ.get("MODE_HOME")
    return Path(home) if home else Path.home() / ".cache" / "mode"


def log(msg: str) -> None:
    print(f"serve-check: {msg}", flush=True)


def ensure_venv() -> None:
    """Reruns this script in the openai venv, creating it first if it lacks the pin."""
    venv = mode_home() / "venvs" / "openai"
    python = venv / "bin" / "python"
    stamp = venv / ".pins"
    if os.environ.get("MODE_SERVE_CHECK_IN_VENV") == "1":
        return
    if not (python.exists() and stamp.exists() and stamp.read_text().strip() == OPENAI_PIN):
        log(f"creating venv {venv} with {OPENAI_PIN}")
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", OPENAI_PIN],
            check=True,
        )
        stamp.write_text(OPENAI_PIN + "\n")
    else:
        log(f"ok (cached): venv {venv}")
    env = dict(os.environ, MODE_SERVE_CHECK_IN_VENV="1")
    os.execve(str(python), [str(python), str(Path(__file__).resolve()), *sys.argv[1:]], env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_binary() -> Path:
    target = os.environ.get("CARGO_TARGET_DIR")
    return (Path(target) if target else ROOT / "target") / "release" / "mode"


class Server:
    """A server (`mode serve`, or llama.cpp's `llama-server` as the peer) in the background, its
    output kept in a log file."""

    def __init__(self, cmd: list, port: int, log_path: Path):
        self.port = port
        self.log_path = log_path
        self.log_file = open(log_path, "w")
        log(f"starting {' '.join(cmd)} (log: {log_path})")
        env = dict(os.environ, MODE_API_KEY=API_KEY)
        self.proc = subprocess.Popen(
            cmd, stdout=self.log_file, stderr=subprocess.STDOUT, env=env
        )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url("/health"), timeout=5) as r:
                return r.status == 200 and json.load(r).get("status") == "ok"
        except OSError:
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise SystemExit(f"the server exited with {self.proc.returncode}:\n{self.tail()}")
            if self.healthy():
                return
            time.sleep(0.5)
        raise SystemExit(f"the server did not answer /health within {timeout:.0f}s:\n{self.tail()}")

    def rss_mib(self) -> float:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return float("nan")

    def cpu_seconds(self) -> float:
        """User plus system CPU seconds the server has used so far (all its threads)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return float("nan")

    def counters(self) -> dict:
        """The server's Prometheus counters (`GET /metrics`) by name; empty when it has none."""
        req = urllib.request.Request(self.url("/metrics"),
                                     headers={"Authorization": f"Bearer {API_KEY}"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                text = r.read().decode()
        except OSError:
            return {}
        out = {}
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 2 and not line.startswith("#"):
                try:
                    out[parts[0]] = float(parts[1])
                except ValueError:
                    pass
        return out

    def tail(self, lines: int = 20) -> str:
        if not self.log_file.closed:
            self.log_file.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()


class Checks:
    def __init__(self):
        self.failures = []

    def check(self, ok: bool, what: str, detail: str = "") -> None:
        if ok:
            log(f"ok: {what}")
        else:
            self.failures.append(what)
            log(f"FAIL: {what} {detail}")


def api_checks(server: Server, checks: Checks) -> str:
    """The client-facing checks; returns the model name the server reports."""
    import openai

    client = openai.OpenAI(
        base_url=server.url("/v1"), api_key=API_KEY, max_retries=0, timeout=300
    )
    try:
        openai.OpenAI(base_url=server.url("/v1"), api_key="wrong", max_retries=0).models.list()
        checks.check(False, "a wrong API key refused", "it was answered")
    except openai.AuthenticationError as e:
        checks.check(e.status_code == 401, f"a wrong API key: 401 {e.message!r}")
    models = [m.id for m in client.models.list().data]
    checks.check(len(models) >= 1, f"models.list: {models}")
    model = models[0]

    c = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=16, temperature=0
    )
    text = c.choices[0].text
    checks.check(
        bool(text.strip()) and c.usage.completion_tokens <= 16,
        f"completion: {text!r} ({c.usage.prompt_tokens} + {c.usage.completion_tokens} tokens, "
        f"{c.choices[0].finish_reason})",
    )

    # stop: cut before the first occurrence of a piece of the answer's own text.
    stop = text.strip()[2:5] if len(text.strip()) >= 5 else None
    if stop:
        c = client.completions.create(
            model=model, prompt="The capital of France is", max_tokens=16, temperature=0,
            stop=[stop, "\u0001"],
        )
        want = text[: text.find(stop)]
        checks.check(
            c.choices[0].text == want and c.choices[0].finish_reason == "stop",
            f"stop={stop!r}: {c.choices[0].text!r} ({c.choices[0].finish_reason})",
            f"want {want!r}",
        )
    else:
        checks.check(False, "stop", f"the completion {text!r} is too short to cut")

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    two = client.chat.completions.create(
        model=model, messages=messages, max_tokens=8, temperature=0.8, seed=1, n=2
    )
    checks.check(
        [c.index for c in two.choices] == [0, 1]
        and all(c.message.content is not None for c in two.choices),
        f"n=2: {[c.message.content for c in two.choices]!r}",
    )
    chat = client.chat.completions.create(
        model=model, messages=messages, max_tokens=32, temperature=0
    )
    answer = chat.choices[0].message.content
    checks.check(
        bool(answer.strip()) and chat.choices[0].message.role == "assistant",
        f"chat completion: {answer!r}",
    )

    deltas = []
    for chunk in client.chat.completions.create(
        model=model, messages=messages, max_tokens=32, temperature=0, stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            deltas.append(chunk.choices[0].delta.content)
    streamed = "".join(deltas)
    checks.check(
        streamed == answer,
        f"streamed chat: {len(deltas)} deltas join to the same greedy answer",
        f"{streamed!r} != {answer!r}",
    )

    def backbone_alone(extra: dict) -> str:
        r = client.chat.completions.create(
            model=model, messages=messages, max_tokens=32, temperature=0, extra_body=extra
        )
        return r.choices[0].message.content

    bare = backbone_alone({"experts": []})
    if len(models) == 1:
        # No expert loaded: the backbone alone is the model itself.
        checks.check(
            bare == answer,
            'extra_body={"experts": []}: the backbone alone, the same answer',
            repr(bare),
        )
    else:
        top0 = backbone_alone({"gate_top_k": 0})
        checks.check(
            bare == top0,
            f'extra_body={{"experts": []}}: the backbone alone: {bare!r} '
            f'(with the experts: {answer!r})',
            f'!= {{"gate_top_k": 0}}: {top0!r}',
        )

    bad_requests = {
        "no messages": dict(messages=[]),
        "temperature 5": dict(messages=messages, temperature=5),
        "max_tokens 0": dict(messages=messages, max_tokens=0),
        "an unknown expert": dict(messages=messages, extra_body={"experts": ["no-such-expert"]}),
        "logit_bias, not implemented": dict(messages=messages, logit_bias={"42": 50}),
    }
    for what, kwargs in bad_requests.items():
        try:
            client.chat.completions.create(model=model, **kwargs)
            checks.check(False, f"malformed request ({what}) refused", "it was answered")
        except openai.BadRequestError as e:
            checks.check(e.status_code == 400, f"malformed request ({what}): 400 {e.message!r}")
        except openai.APIError as e:
            checks.check(False, f"malformed request ({what}) refused with 400", repr(e))

    body = json.dumps({"model": model, "messages": messages, "max_tokens": 32, "temperature": 0})
    out = subprocess.run(
        ["curl", "-sS", "--fail-with-body", "-H", "Content-Type: application/json",
         "-H", f"Authorization: Bearer {API_KEY}", "-d", body,
         server.url("/v1/chat/completions")],
        capture_output=True,
        text=True,
    )
    try:
        curl_answer = json.loads(out.stdout)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError):
        curl_answer = None
    checks.check(
        out.returncode == 0 and curl_answer == answer,
        "curl chat completion: the same answer",
        f"rc {out.returncode}: {out.stdout[:200]!r} {out.stderr[:200]!r}",
    )
    return model


# The counters, ours then llama-server's (with --metrics), of prompt tokens run through the model.
PROMPT_READ_COUNTERS = ("mode_prompt_tokens_total", "llamacpp:prompt_tokens_total")


def expert_sets(server: Server) -> list:
    """The backbone alone, each loaded expert alone, then all of them: what `--expert-mix` cycles."""
    req = urllib.request.Request(server.url("/v1/experts"),
                                 headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        names = json.load(r)["experts"]
    if not names:
        raise SystemExit("--expert-mix: the server has no experts; pass --serve-arg=--expert ...")
    return [[]] + [[n] for n in names] + ([names] if len(names) > 1 else [])


def load(server: Server, model: str, clients: int, seconds: float, max_tokens: int,
         checks: Checks, sets: list | None = None) -> dict:
    import openai

    latencies, errors, tokens = [], [], []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client_loop(i: int) -> None:
        client = openai.OpenAI(
            base_url=server.url("/v1"), api_key=API_KEY, max_retries=0, timeout=600
        )
        n = 0
        while time.monotonic() < deadline:
            start = time.monotonic()
            extra = {"experts": sets[(i + n) % len(sets)]} if sets else None
            try:
                r = client.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": f"Client {i}, request {n}: name a colour."}],
                    max_tokens=max_tokens,
                    temperature=0.7,
                    seed=i * 1000 + n,
                    extra_body=extra,
                )
                if not r.choices or r.choices[0].message.content is None:
                    raise ValueError(f"empty answer: {r}")
                with lock:
                    latencies.append(time.monotonic() - start)
                    tokens.append(r.usage.completion_tokens if r.usage else 0)
            except Exception as e:  # every failure counts, whatever it is
                with lock:
                    errors.append(f"client {i} request {n}: {type(e).__name__}: {e}")
            n += 1

    rss_before = server.rss_mib()
    counters_before, server_cpu_before = server.counters(), server.cpu_seconds()
    client_cpu_before = time.process_time()
    mix = f", expert sets cycling over {sets}" if sets else ""
    log(f"load: {clients} clients for {seconds:.0f}s (chat, max_tokens {max_tokens}{mix})")
    started = time.monotonic()
    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    client_cores = (time.process_time() - client_cpu_before) / elapsed
    server_cores = (server.cpu_seconds() - server_cpu_before) / elapsed
    counters_after = server.counters()
    # Prompt tokens the server actually ran through the model (not those its prompt cache held).
    read = [counters_after[k] - counters_before.get(k, 0.0) for k in PROMPT_READ_COUNTERS
            if k in counters_after]
    prompt_read_per_sec = round(read[0] / elapsed, 2) if read else None

    done = len(latencies)
    lat = sorted(latencies)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")

    print(
        f"load: {clients} clients: {done} requests done, {len(errors)} failures in {elapsed:.1f}s "
        f"({done / elapsed:.2f} requests/s, {sum(tokens) / elapsed:.1f} completion tokens/s); "
        f"latency p50 {pct(0.50):.2f}s, "
        f"p95 {pct(0.95):.2f}s, max {lat[-1] if lat else float('nan'):.2f}s; "
        f"server RSS {rss_before:.0f} -> {server.rss_mib():.0f} MiB; "
        f"prompt tokens read {prompt_read_per_sec if prompt_read_per_sec is not None else '?'}/s; "
        f"CPU cores used: server {server_cores:.2f}, these clients {client_cores:.2f}",
        flush=True,
    )
    for e in errors[:10]:
        log(f"  {e}")
    checks.check(done > 0, f"load: {done} requests answered")
    checks.check(not errors, "load: no failures", f"({len(errors)} failures)")
    checks.check(server.alive() and server.healthy(), "load: the server is alive and answers /health")
    return {
        "clients": clients,
        "expert_sets": sets or None,
        "requests": done,
        "failures": len(errors),
        "seconds": round(elapsed, 1),
        "requests_per_sec": round(done / elapsed, 3),
        "completion_tokens_per_sec": round(sum(tokens) / elapsed, 2),
        "latency_p50_s": round(pct(0.50), 3),
        "latency_p95_s": round(pct(0.95), 3),
        "completion_tokens_per_request": round(sum(tokens) / done, 2) if done else None,
        "prompt_tokens_read_per_sec": prompt_read_per_sec,
        "server_cores": round(server_cores, 2),
        "client_cores": round(client_cores, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60, help="length of the load phase")
    parser.add_argument("--clients", default="32",
                        help="concurrent clients in the load phase; a comma-separated list "
                             "(1,8,32) runs one phase per count, --seconds each")
    parser.add_argument("--max-tokens", type=int, default=8,
                        help="max_tokens of each request in the load phase")
    parser.add_argument("--mode", type=Path, default=default_binary(), help="the mode binary")
    parser.add_argument("--startup-timeout", type=float, default=600,
                        help="seconds to wait for the server (the first run fetches the backbone)")
    parser.add_argument("--serve-arg", action="append", default=[],
                        help="an extra argument for `mode serve` (repeatable)")
    parser.add_argument("--llama-server", type=Path,
                        help="measure llama.cpp's llama-server instead of mode (the peer; from "
                             "bench/peer/build_llama_cpp.sh): only the load phases run, on --gguf "
                             "with --parallel slots of --ctx-per-slot tokens and --peer-threads")
    parser.add_argument("--gguf", type=Path, help="the model file llama-server loads")
    parser.add_argument("--parallel", type=int, default=32, help="llama-server's slots (-np)")
    parser.add_argument("--ctx-per-slot", type=int, default=512,
                        help="llama-server's context per slot (its -c is this times --parallel)")
    parser.add_argument("--peer-threads", type=int, default=2, help="llama-server's -t")
    parser.add_argument("--expert-mix", action="store_true",
                        help="load requests cycle over expert sets: the backbone alone, each loaded "
                             "expert alone, all of them (the server needs --serve-arg=--expert ...)")
    args = parser.parse_args()
    ensure_venv()
    peer = args.llama_server is not None
    if peer and (args.gguf is None or not args.gguf.exists() or not args.llama_server.exists()):
        log("--llama-server needs an existing binary and an existing --gguf file")
        return 2
    if not peer and not args.mode.exists():
        log(f"{args.mode} is missing: run `cargo build --release` (or `make build`) first")
        return 2
    if shutil.which("curl") is None:
        log("curl is required")
        return 2
    import openai

    log(f"openai {openai.__version__}, python {sys.version.split()[0]}")
    log_dir = mode_home() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    if peer:
        cmd = [str(args.llama_server), "-m", str(args.gguf), "--host", "127.0.0.1",
               "--port", str(port), "-np", str(args.parallel),
               "-c", str(args.parallel * args.ctx_per_slot), "-t", str(args.peer_threads),
               "--api-key", API_KEY, "--metrics"]
        server = Server(cmd, port, log_dir / "llama-server.log")
    else:
        cmd = [str(args.mode), "serve", "--port", str(port), *args.serve_arg]
        server = Server(cmd, port, log_dir / "serve-check.log")
    checks = Checks()
    try:
        server.wait_ready(args.startup_timeout)
        model = "peer" if peer else api_checks(server, checks)
        levels = [int(c) for c in str(args.clients).split(",") if c.strip()]
        if not levels or min(levels) < 1:
            raise SystemExit(f"--clients {args.clients}: need positive counts")
        sets = expert_sets(server) if args.expert_mix else None
        summary = [load(server, model, c, args.seconds, args.max_tokens, checks, sets)
                   for c in levels]
        print(json.dumps({"server": "llama.cpp" if peer else "mode", "load": summary}),
              flush=True)
    except SystemExit as e:
        checks.failures.append(str(e))
        log(f"FAIL: {e}")
    except Exception as e:  # a check that crashed is a failure, reported as such
        checks.failures.append(repr(e))
        log(f"FAIL: {type(e).__name__}: {e}")
    finally:
        server.stop()
    if checks.failures:
        log(f"{len(checks.failures)} check(s) failed; server log tail:\n{server.tail()}")
        return 1
    log("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
