"""The federated apps under Flower's deployment engine on loopback: a SuperLink, two SuperNodes, `flwr run`.

Flower 1.42's SuperLink serves its Fleet, Control and Runtime (ServerAppIo) APIs over one HTTP port (`--host`,
`--port`), and each SuperNode serves its Runtime (ClientAppIo) API on its own `--port`; the test picks three free
ports. The SuperLink starts the ServerApp (`flwr-serverapp`) and each SuperNode starts one `flwr-clientapp` process
per message, through `flower-superexec` found on PATH, all in their own working directories, so every path in the
run config is absolute. `flwr run` reads the SuperLink connection from `$FLWR_HOME/config.toml`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
EXECUTABLES = ("flower-superlink", "flower-supernode", "flower-superexec", "flwr-serverapp", "flwr-clientapp", "flwr")
BUDGET = 240.0  # seconds for the whole run, start-up included
CONNECTION = "loopback"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 40) -> str:
    if not path.is_file():
        return f"--- {path.name}: (no log)"
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return f"--- {path.name} (last {min(lines, len(text))} of {len(text)} lines):\n" + "\n".join(text[-lines:])


class Processes:
    """Background processes, each in its own session with its output in a log file; `stop()` ends them all,
    with the processes they started (SuperExec, ServerApp and ClientApp processes)."""

    def __init__(self, folder: Path, env: dict):
        self.folder, self.env = folder, env
        self.running: dict[str, subprocess.Popen] = {}

    def log(self, name: str) -> Path:
        return self.folder / f"{name}.log"

    def start(self, name: str, *args: str) -> subprocess.Popen:
        with self.log(name).open("wb") as out:
            process = subprocess.Popen([str(BIN / args[0]), *args[1:]], stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=self.env, cwd=self.folder, start_new_session=True)
        self.running[name] = process
        return process

    def check_alive(self) -> None:
        for name, process in self.running.items():
            if process.poll() is not None:
                pytest.fail(f"{name} exited early (code {process.returncode}).\n{self.report()}")

    def report(self) -> str:
        logs = sorted(self.folder.glob("*.log"))
        return "\n".join(_tail(path) for path in logs)

    def stop(self) -> None:
        try:
            import psutil
        except ImportError:  # only the process groups then
            psutil = None
        descendants = []
        if psutil is not None:
            for process in self.running.values():
                try:
                    descendants += psutil.Process(process.pid).children(recursive=True)
                except psutil.Error:
                    pass
        for process in self.running.values():
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for child in descendants:
            try:
                child.terminate()
            except psutil.Error:
                pass
        deadline = time.monotonic() + 10
        for process in self.running.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait(timeout=5)
        if psutil is not None:
            _, alive = psutil.wait_procs(descendants, timeout=max(0.1, deadline - time.monotonic()))
            for child in alive:
                try:
                    child.kill()
                except psutil.Error:
                    pass


def _wait_for_port(port: int, processes: Processes, deadline: float) -> None:
    while time.monotonic() < deadline:
        processes.check_alive()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(1)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    pytest.fail(f"the SuperLink did not open port {port} in time.\n{processes.report()}")


def _flwr(env: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flwr"), *args], env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False)


def _wait_for_nodes(count: int, env: dict, processes: Processes, deadline: float) -> None:
    """Until the SuperLink lists `count` online SuperNodes (round 0 evaluates the nodes connected at the start)."""
    listing = None
    while time.monotonic() < deadline:
        processes.check_alive()
        listing = _flwr(env, "supernode", "list", CONNECTION, "--format", "json")
        if listing.returncode == 0:
            try:
                nodes = json.loads(listing.stdout)["nodes"]
            except (ValueError, KeyError):
                nodes = []
            if sum(node.get("status") == "online" for node in nodes) >= count:
                return
        time.sleep(1)
    shown = f"{listing.stdout}\n{listing.stderr}" if listing else ""
    pytest.fail(f"{count} SuperNodes did not come online in time: {shown}\n{processes.report()}")


def _recipe(folder: Path) -> Path:
    """recipes/fedlora/tiny.yaml made small: a tiny base model built from scratch (by the server and by each
    client, in its work dir), 2 clients, 5 local steps, few and short evaluations."""
    recipe = yaml.safe_load((REPO / "recipes/fedlora/tiny.yaml").read_text(encoding="utf-8"))
    recipe["run"]["output_dir"] = str(folder / "runs")
    recipe["model"] = {"name": "tiny:qwen2-xs", "tokenizer_vocab_size": 600}
    recipe["data"]["instructions"].update(examples_per_category=40, max_new_tokens=4)
    recipe["stages"][0]["args"].update(max_steps=5, per_device_train_batch_size=8, logging_steps=5)
    recipe["federated"].update(num_clients=2, rounds=3, max_eval_rows=8, eval_batch_size=8, round_timeout=120)
    recipe["federated"]["partition"]["min_examples"] = 5
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def test_deployment_engine_runs_the_federated_apps(tmp_path):
    missing = [name for name in EXECUTABLES if not (BIN / name).is_file()]
    if missing:
        pytest.skip(f"Flower's executables are not installed next to {sys.executable}: {', '.join(missing)} "
                    "(pip install -e '.[flower]')")
    started = time.monotonic()
    deadline = started + BUDGET
    home, logs = tmp_path / "flwr-home", tmp_path / "logs"
    home.mkdir()
    logs.mkdir()
    link_port, node_ports = _free_port(), [_free_port(), _free_port()]
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{link_port}"\ninsecure = true\n', encoding="utf-8")
    recipe = _recipe(tmp_path)
    # overrides travel in the run config too (the recipe above says 3 rounds)
    overrides = "run.name=deployed federated.rounds=2"
    run_dir = tmp_path / "runs" / "deployed"
    work_dirs = [tmp_path / f"node-{i}" for i in range(2)]

    processes = Processes(logs, env)
    try:
        processes.start("superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port",
                        str(link_port), "--disable-runtime-dependency-installation")
        _wait_for_port(link_port, processes, deadline)
        for i, (port, work_dir) in enumerate(zip(node_ports, work_dirs)):
            processes.start(f"supernode-{i}", "flower-supernode", "--insecure", "--superlink",
                            f"127.0.0.1:{link_port}", "--host", "127.0.0.1", "--port", str(port), "--node-config",
                            f"partition-id={i} num-partitions=2 work-dir='{work_dir}' num-threads=1")
        _wait_for_nodes(2, env, processes, deadline)

        run_config = f"recipe='{recipe}' overrides='{overrides}'"
        try:
            submitted = _flwr(env, "run", str(REPO / "flower"), CONNECTION, "--run-config", run_config, "--stream",
                              timeout=max(1.0, deadline - time.monotonic()))
            output = submitted.stdout + submitted.stderr
        except subprocess.TimeoutExpired as err:
            output = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
            pytest.fail(f"`flwr run` did not finish within {BUDGET:.0f} s.\n--- flwr run:\n{output[-4000:]}\n"
                        f"{processes.report()}")
        (logs / "flwr-run.log").write_text(output, encoding="utf-8")

        def report() -> str:
            return f"--- flwr run (code {submitted.returncode}):\n{output[-4000:]}\n{processes.report()}"

        assert submitted.returncode == 0, report()
        status = json.loads((run_dir / "status.json").read_text()) if (run_dir / "status.json").is_file() else {}
        assert status.get("state") == "complete", f"status.json: {status}\n{report()}"

        run_id = next((line.split()[-1] for line in output.splitlines() if "Successfully started run" in line), None)
        assert run_id is not None, report()
        listed = _flwr(env, "list", CONNECTION, "--run-id", run_id, "--format", "json")
        runs = json.loads(listed.stdout).get("runs", []) if listed.returncode == 0 else []
        assert runs and runs[0]["status"] == "finished:completed", f"{listed.stdout}\n{listed.stderr}\n{report()}"

        records = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
        assert [r["round"] for r in records] == [0, 1, 2], report()
        assert [r["accepted"] for r in records[1:]] == [2, 2], f"{records[1:]}\n{report()}"
        assert sorted(e["client"] for e in records[0]["eval"]) == [0, 1], report()
        assert (run_dir / "final" / "adapter_config.json").is_file(), report()
        for i, work_dir in enumerate(work_dirs):
            assert list((work_dir / f"client-{i}").glob("private-round-*.safetensors")), \
                f"client {i} kept no private tensors in {work_dir}\n{report()}"
            assert (work_dir / "base" / "config.json").is_file(), report()  # built by the client, not the server's
        print(f"deployment run: {time.monotonic() - started:.0f} s")
    finally:
        processes.stop()
