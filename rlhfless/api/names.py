"""The one rule for an RLHFJob's name, shared by the CLI, the operator and the CRD schema.

Knative names a Service's revisions "<service>-00001" and their private Services
"<revision>-private"; all of them must stay DNS-1035 labels (63 characters, starting with a
letter). Ten characters are reserved for the "-<stage>" suffix, whatever stages exist now,
so a name that was valid once stays valid when stages are renamed or added.
"""

from __future__ import annotations

import re

STAGE_SUFFIX_RESERVE = 10  # "-" + a stage name of at most 9 characters
MAX_JOB_NAME = 63 - len("-00001-private") - STAGE_SUFFIX_RESERVE  # 39
DNS1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"  # what Knative Service names are
DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"  # what namespace names are
JOB_NAME_PATTERN = DNS1035_LABEL
NAMESPACE_PATTERN = DNS1123_LABEL
MAX_NAMESPACE = 63


def name_errors(name: str) -> list[str]:
    """Why `name` cannot name an RLHFJob (empty when it can)."""
    errors = []
    if not re.fullmatch(JOB_NAME_PATTERN, name):
        errors.append("must start with a lowercase letter, end with a letter or digit, and "
                      "contain only lowercase letters, digits and '-' (a DNS-1035 label, as "
                      "Knative Services need)")
    if len(name) > MAX_JOB_NAME:
        errors.append(f"at most {MAX_JOB_NAME} characters (Knative derives revision and "
                      f"Service names from it), got {len(name)}")
    return errors


def namespace_errors(namespace: str) -> list[str]:
    """Why `namespace` cannot name a Kubernetes namespace (empty when it can)."""
    if re.fullmatch(NAMESPACE_PATTERN, namespace) and len(namespace) <= MAX_NAMESPACE:
        return []
    return [f"must be a DNS-1123 label: at most {MAX_NAMESPACE} lowercase letters, digits "
            "and '-', starting and ending with a letter or digit"]
