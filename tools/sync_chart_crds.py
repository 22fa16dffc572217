"""Copy crds/ (the single source) into the chart as a template behind crds.enabled, kept on uninstall.

`make chart-crds` runs it; tests/charts checks the chart's copy matches crds/.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "charts" / "llmservice-operator" / "templates" / "crd-llmservices.yaml"
HEADER = """{{- if .Values.crds.enabled }}
# Generated from crds/ by tools/sync_chart_crds.py (make chart-crds): do not edit here.
"""
KEEP = """  annotations:
    # helm uninstall must never delete the CRD (and with it every LLMService).
    helm.sh/resource-policy: keep
"""


def render(source: str) -> str:
    body = source.split("\n", 1)[1] if source.startswith("#") else source
    marker = "metadata:\n  name: llmservices.serving.llmservice.io\n"
    if marker not in body:
        raise SystemExit("crds/: unexpected metadata block")
    return HEADER + body.replace(marker, marker + KEEP) + "{{- end }}\n"


def main() -> int:
    source = (ROOT / "crds" / "serving.llmservice.io_llmservices.yaml").read_text()
    TARGET.write_text(render(source))
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
