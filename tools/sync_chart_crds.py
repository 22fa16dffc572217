"""Copy crds/ (the single source) into the chart as a template behind crds.enabled.

The CRD's own annotations keep it on helm uninstall and out of Argo CD's and Flux's prunes, wherever it
is installed from. `make chart-crds` runs it; tests/charts checks the chart's copy matches crds/.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "charts" / "llmservice-operator" / "templates" / "crd-llmservices.yaml"
HEADER = """{{- if .Values.crds.enabled }}
# Generated from crds/ by tools/sync_chart_crds.py (make chart-crds): do not edit here.
"""


def render(source: str) -> str:
    body = source.split("\n", 1)[1] if source.startswith("#") else source
    return HEADER + body + "{{- end }}\n"


def main() -> int:
    source = (ROOT / "crds" / "serving.llmservice.io_llmservices.yaml").read_text()
    TARGET.write_text(render(source))
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
