"""Run the app on a real Flower federation on this machine, or make the files a real one needs.

    python deploy/local_federation.py run --nodes 3 --mode insecure --run-config experiments/quickstart.toml
    python deploy/local_federation.py run --nodes 3 --mode tls-auth --run-config 'dataset="synthetic" model="cnn"'
    python deploy/local_federation.py certs deploy/work/files --nodes 3 --hosts 10.0.0.5 superlink.lab

``run`` starts a SuperLink and ``--nodes`` SuperNodes on free ports of 127.0.0.1 (``insecure``;
``tls``: a test CA and server certificate; ``tls-auth``: TLS plus one registered key pair per
SuperNode), each with node config ``partition-id``, ``num-partitions``, ``data-dir`` and its own
``state-dir``, submits the run and streams it as ``fedlora-flwr run`` does, then stops every
process it started, by PID (on Ctrl-C too). Its exit code is the run's status, as ``fedlora-flwr
run``'s (0: finished; see ``fedlora_flwr.exits``), or 124 after ``--timeout``. Files live under ``--workdir``
(``superlink/``, ``nodes/<partition-id>/`` with each SuperNode's log and ``state/``, ``tls/``,
``keys/``). Relative ``data-dir``/``output-dir`` are taken from the current directory.

``certs`` writes the test CA, a server certificate for ``--hosts`` and ``--nodes`` SuperNode key
pairs, for the commands of docs/deploy.md ("Deploy a real federation").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flwr.common.config import parse_config_args

APP_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(APP_DIR))  # run from a checkout without installing

from fedlora_flwr.config import RunConfig  # noqa: E402
from fedlora_flwr.deployment import LOOPBACK_NAMES, MODES, LocalFederation, make_node_key, make_tls  # noqa: E402

PATH_KEYS = ("data-dir", "output-dir")


def run(args: argparse.Namespace) -> int:
    run_config = parse_config_args([args.run_config]) if args.run_config else {}
    for key in PATH_KEYS:  # the ServerApp runs in the SuperLink's folder: send absolute paths
        default = RunConfig.model_fields[key.replace("-", "_")].default
        run_config[key] = str(Path(str(run_config.get(key, default))).expanduser().resolve())
    data_dir = Path(args.data_dir or run_config["data-dir"])
    with LocalFederation(Path(args.workdir), args.nodes, args.mode, data_dir=data_dir) as federation:
        print(f"SuperLink {federation.link.address} ({args.mode}), {args.nodes} SuperNodes; files in {federation.workdir}")
        try:
            code, _ = federation.run(APP_DIR, run_config, timeout=args.timeout, on_line=print)
        except TimeoutError as err:
            print(f"local_federation: {err}; stopping every process", file=sys.stderr)
            return 124
    return code


def certs(args: argparse.Namespace) -> int:
    folder = Path(args.folder)
    tls = make_tls(folder / "tls", hosts=tuple(args.hosts))
    print(f"CA {tls.ca_cert}, SuperLink certificate {tls.server_cert} for {', '.join(args.hosts)}, key {tls.server_key}")
    for partition_id in range(args.nodes):
        private, public = make_node_key(folder / "keys", f"node-{partition_id}")
        print(f"SuperNode {partition_id}: private key {private}, public key {public}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("run", help="start a SuperLink and SuperNodes here, flwr run the app, stop them")
    start.add_argument("--nodes", type=int, default=3, help="SuperNodes, one per partition (default 3)")
    start.add_argument("--mode", choices=MODES, default="insecure", help="default: insecure")
    start.add_argument("--workdir", default="deploy/work", help="certificates, keys, logs, node state (default deploy/work)")
    start.add_argument("--data-dir", help="every SuperNode's data-dir (default: the run config's)")
    start.add_argument("--run-config", help="a TOML file or 'key=value ...', as for flwr run")
    start.add_argument("--timeout", type=float, default=None, help="stop everything after this many seconds")
    start.set_defaults(func=run)
    files = commands.add_parser("certs", help="make a test CA, a SuperLink certificate and SuperNode key pairs")
    files.add_argument("folder")
    files.add_argument("--nodes", type=int, default=3)
    files.add_argument("--hosts", nargs="+", default=list(LOOPBACK_NAMES), help="names/IPs of the SuperLink")
    files.set_defaults(func=certs)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
