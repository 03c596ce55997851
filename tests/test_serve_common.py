"""A ``polymerge serve`` process for the server tests: started on a free loopback port (the
server picks it and prints it), waited for, and stopped with SIGTERM."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

KEY_ENV = "POLYMERGE_TEST_KEY"
KEY = "s3cret-key"


class ServerProcess:
    """``python -m polymerge.cli serve TARGET --port 0 ARGS...`` in ``cwd``."""

    def __init__(self, target: Path, *args: str, cwd: Path, key: bool = False) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
        if key:
            env[KEY_ENV] = KEY
            args = (*args, "--api-key-env", KEY_ENV)
        self.target = target
        self.key = key
        self.log = cwd.parent / f"{cwd.name}.log"
        self._err = self.log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "polymerge.cli", "serve", str(target), "--port", "0",
             "--threads", "1", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
            stderr=self._err, text=True)
        self.url = ""

    def wait(self, timeout: float = 120.0) -> ServerProcess:
        """Until the server prints its address and answers /health."""
        end = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while not self.url:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n"
                                   + self.log.read_text()[-3000:])
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if ready:
                line = self.proc.stdout.readline()
                if "http://" in line:
                    self.url = line.strip().rsplit(" at ", 1)[1]
            if time.monotonic() > end:
                raise TimeoutError("the server did not start:\n" + self.log.read_text()[-3000:])
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > end:
                raise TimeoutError("the server does not answer /health")
            time.sleep(0.05)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {KEY}"} if self.key else {}

    def post(self, path: str, body: Any = None, *, content: bytes | None = None,
             timeout: float = 60.0, **kwargs: Any) -> httpx.Response:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        if content is not None:
            return httpx.post(self.url + path, content=content, headers=headers,
                              timeout=timeout, **kwargs)
        return httpx.post(self.url + path, json=body, headers=headers, timeout=timeout,
                          **kwargs)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        return httpx.get(self.url + path, headers=headers, timeout=30, **kwargs)

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a metric's samples whose labels include ``labels``."""
        total = 0.0
        for line in self.get("/metrics").text.splitlines():
            if not line.startswith(name):
                continue
            head, _, value = line.rpartition(" ")
            series, _, rest = head.partition("{")
            if series != name:
                continue
            if all(f'{k}="{v}"' in rest for k, v in labels.items()):
                total += float(value)
        return total

    def openai(self) -> Any:
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=KEY if self.key else "none",
                      max_retries=0, timeout=60)

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._err.close()
        return int(self.proc.returncode)
