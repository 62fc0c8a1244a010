"""Parses a scrape of a Sigil /metrics endpoint with prometheus_client.

Reads the exposition from stdin; parses it twice: with the strict
OpenMetrics parser (what Prometheus negotiates for this content type) and
with the classic text-format parser. Prints one JSON object: sample name ->
list of [labels, value], from the OpenMetrics parse; exits non-zero with the
parser's error when either parse fails or their sample sets differ in names.
Used by tests/tests/metrics.rs (not a pytest module).
"""

import json
import sys

from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families as text_families


def main() -> int:
    text = sys.stdin.read()
    samples = {}
    for family in openmetrics_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append([dict(s.labels), s.value])
    classic = set()
    for family in text_families(text):
        for s in family.samples:
            classic.add(s.name)
    missing = sorted(set(samples) - classic)
    if missing:
        print(f"classic parser lost samples: {missing}", file=sys.stderr)
        return 1
    json.dump(samples, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
