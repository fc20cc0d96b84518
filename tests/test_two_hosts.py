"""Bulk synthesis across two "hosts": network namespaces joined to this machine by
veth pairs, each running a captrain worker that reaches Redis and PostgreSQL over its
veth address. All traffic stays inside these namespaces and loopback.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import uuid

import pytest
from conftest import ROOT, wait_for

pytestmark = pytest.mark.integration
SUBNET = "10.213"  # addresses that exist only on the veth pairs made here


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _can_make_namespaces() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("ip") is None:
        return "needs iproute2's ip"
    return None


class _Forwarder:
    """TCP forwarder from the veth addresses to PostgreSQL on loopback."""

    def __init__(self, addrs: list[str], target: tuple[str, int]) -> None:
        self.target = target
        self.socks = []
        self.port = 0
        for addr in addrs:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((addr, self.port))
            self.port = s.getsockname()[1]
            s.listen(64)
            self.socks.append(s)
            threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        for s in self.socks:
            s.close()


def test_one_generation_job_is_shared_by_two_hosts(tmp_path, pg_url):
    why = _can_make_namespaces()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the two-host test must run in CI: {why}")
        pytest.skip(why)

    from shared import migrate

    tag = uuid.uuid4().hex[:4]
    hosts = [f"ct{tag}h{i}" for i in (1, 2)]
    root_addrs = [f"{SUBNET}.{i}.1" for i in (1, 2)]
    from conftest import free_port, system_redis_server

    redis_port = free_port()
    made: list[str] = []
    procs: list[subprocess.Popen] = []
    forwarder = None
    try:
        for i, (ns, root_addr) in enumerate(zip(hosts, root_addrs, strict=True), start=1):
            veth, peer = f"ct{tag}v{i}", f"ct{tag}p{i}"
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
            _ip("link", "set", peer, "netns", ns)
            _ip("addr", "add", f"{root_addr}/30", "dev", veth)
            _ip("link", "set", veth, "up")
            _ip("netns", "exec", ns, "ip", "addr", "add", f"{SUBNET}.{i}.2/30", "dev", peer)
            _ip("netns", "exec", ns, "ip", "link", "set", peer, "up")
            _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        redis = subprocess.Popen(
            [system_redis_server(), "--port", str(redis_port), "--bind", "127.0.0.1", *root_addrs,
             "--requirepass", "two-hosts", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(redis)
        forwarder = _Forwarder(root_addrs, ("127.0.0.1", 5432))
        from sqlalchemy import create_engine

        engine = create_engine(pg_url)
        migrate.upgrade(engine)
        engine.dispose()
        local = {"CAPTRAIN_HOME": str(tmp_path / "home"),
                 "CAPTRAIN_BROKER_URL": f"redis://:two-hosts@127.0.0.1:{redis_port}/0",
                 "CAPTRAIN_DATABASE_URL": pg_url}
        wait_for(lambda: redis.poll() is None and _redis_up(local["CAPTRAIN_BROKER_URL"]), 30,
                 what="redis")
        user_host = pg_url.split("//", 1)[1].split("@", 1)[0]
        db = pg_url.rsplit("/", 1)[1]
        logs = []
        for i, (ns, root_addr) in enumerate(zip(hosts, root_addrs, strict=True), start=1):
            env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTRAIN_")}
            env.update(
                CAPTRAIN_HOME=str(tmp_path / f"host{i}"),
                CAPTRAIN_BROKER_URL=f"redis://:two-hosts@{root_addr}:{redis_port}/0",
                CAPTRAIN_DATABASE_URL=(f"postgresql+psycopg://{user_host}@{root_addr}:"
                                       f"{forwarder.port}/{db}"),
            )
            log = tmp_path / f"host{i}.log"
            logs.append(log)
            with open(log, "wb") as fh:
                procs.append(subprocess.Popen(
                    ["ip", "netns", "exec", ns, sys.executable, "-m", "scheduler.cli",
                     "worker", "-Q", "cpu", "-c", "1", "-n", f"host{i}@%h"],
                    cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                    start_new_session=True))
        for log in logs:
            wait_for(lambda log=log: " ready." in log.read_text(errors="replace"), 60,
                     what=f"worker in {log.stem}")
        # The submitting CLI runs as a user runs it: a process of its own, which reads
        # its broker (this test's Redis) once.
        user_env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTRAIN_")}
        user_env.update(local)

        def cli(*args: str) -> dict:
            r = subprocess.run([sys.executable, "-m", "scheduler.cli", *args, "--json"],
                               cwd=ROOT, env=user_env, capture_output=True, text=True,
                               timeout=240)
            assert r.returncode == 0, r.stdout + r.stderr
            return json.loads(r.stdout)

        done = cli("generate", "--name", f"two-hosts-{tag}", "--count", "1200",
                   "--shard-size", "60", "--wait")
        job = cli("job", str(done["id"]))
        makers: dict[str, int] = {}
        for sh in job["shard_list"]:
            makers[sh["worker"].split("@")[0]] = makers.get(sh["worker"].split("@")[0], 0) + 1
        print(f"\ntwo hosts: shards per host {makers} of {job['shards']}")
        assert job["status"] == "done"
        assert set(makers) == {"host1", "host2"}
    finally:
        for p in procs[1:]:
            if p.poll() is None:
                os.killpg(p.pid, 15)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, 9)
        if procs:
            procs[0].terminate()
            procs[0].wait()
        if forwarder:
            forwarder.close()
        for ns in made:
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)


def _redis_up(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False
