"""`python -m controlplane up|down|build [--dir .cluster]`: what `make cluster-up`, `cluster-down` run."""

import argparse
import sys
from pathlib import Path

from controlplane.cluster import Cluster, ClusterError


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m controlplane")
    parser.add_argument("command", choices=["up", "down", "build"])
    parser.add_argument(
        "--dir", type=Path, default=Path(".cluster"), help="state directory (default .cluster)"
    )
    args = parser.parse_args()
    cluster = Cluster(args.dir)
    try:
        if args.command == "build":
            from controlplane.cluster import build_binaries

            print(build_binaries())
        elif args.command == "up":
            seconds = cluster.up()
            layout = cluster.layout
            print(f"cluster ready in {seconds:.1f} s (binaries already built)")
            print(f"  export KUBECONFIG={layout.kubeconfig}  PATH={layout.bin}:$PATH")
            print(f"  logs: {layout.logs}; the operator runs as {cluster.operator_identity()}")
        else:
            cluster.down()
    except ClusterError as error:
        print(f"controlplane: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
