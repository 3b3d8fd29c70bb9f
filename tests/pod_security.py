"""The Pod Security Standards' "restricted" profile (baseline included), as a checker.

Written from the policy's published controls (kubernetes.io/docs/concepts/security/
pod-security-standards, as enforced by the PodSecurity admission plugin for the latest
version); `restricted_violations(pod_spec)` lists what the admission plugin would refuse, one
line per control. `pod_specs(obj)` finds the pod template in any workload this project
renders: Pod, Deployment, Job, Knative Service. Our own stricter rules (read-only root
filesystem, no service-account token where no API access is needed) are `hardening_gaps`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

# Baseline: capabilities a container may add.
BASELINE_CAPABILITIES = frozenset({
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
    "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
})
SAFE_SYSCTLS = frozenset({
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
})
SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t",
                           "container_engine_t"})
# Restricted: the only volume types allowed.
RESTRICTED_VOLUMES = frozenset({"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                                "persistentVolumeClaim", "projected", "secret"})


def _containers(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for field in ("initContainers", "containers", "ephemeralContainers"):
        for i, container in enumerate(spec.get(field) or []):
            yield f"{field}[{i}]", container


def _seccomp_type(context: dict[str, Any] | None) -> str | None:
    return ((context or {}).get("seccompProfile") or {}).get("type")


def baseline_violations(spec: dict[str, Any]) -> list[str]:
    out = []
    pod_sc = spec.get("securityContext") or {}
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            out.append(f"host namespaces: {field} must be unset or false")
    if (pod_sc.get("windowsOptions") or {}).get("hostProcess"):
        out.append("HostProcess: securityContext.windowsOptions.hostProcess must not be true")
    for i, volume in enumerate(spec.get("volumes") or []):
        if "hostPath" in volume:
            out.append(f"hostPath volumes: volumes[{i}] is a hostPath")
    if _seccomp_type(pod_sc) == "Unconfined":
        out.append("seccomp: securityContext.seccompProfile must not be Unconfined")
    for sysctl in pod_sc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            out.append(f"sysctls: {sysctl.get('name')} is not a safe sysctl")
    for where, context in [("securityContext", pod_sc)] + [
            (f"{w}.securityContext", c.get("securityContext") or {}) for w, c in _containers(spec)]:
        selinux = context.get("seLinuxOptions") or {}
        if selinux.get("type", "") not in SELINUX_TYPES:
            out.append(f"SELinux: {where}.seLinuxOptions.type {selinux['type']!r} not allowed")
        if selinux.get("user") or selinux.get("role"):
            out.append(f"SELinux: {where}.seLinuxOptions user/role must be unset")
        apparmor = (context.get("appArmorProfile") or {}).get("type")
        if apparmor not in (None, "RuntimeDefault", "Localhost"):
            out.append(f"AppArmor: {where}.appArmorProfile.type {apparmor!r} not allowed")
    for where, container in _containers(spec):
        sc = container.get("securityContext") or {}
        if sc.get("privileged"):
            out.append(f"privileged: {where} must not be privileged")
        added = set((sc.get("capabilities") or {}).get("add") or [])
        if added - BASELINE_CAPABILITIES:
            out.append(f"capabilities: {where} adds {sorted(added - BASELINE_CAPABILITIES)}")
        for port in container.get("ports") or []:
            if port.get("hostPort"):
                out.append(f"host ports: {where} uses hostPort {port['hostPort']}")
        if sc.get("procMount", "Default") != "Default":
            out.append(f"/proc mount: {where}.securityContext.procMount must be Default")
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            out.append(f"HostProcess: {where} must not be a host process")
        if _seccomp_type(sc) == "Unconfined":
            out.append(f"seccomp: {where}.securityContext.seccompProfile is Unconfined")
    return out


def restricted_violations(spec: dict[str, Any]) -> list[str]:
    """Everything the "restricted" profile refuses in a pod spec (baseline included)."""
    out = baseline_violations(spec)
    pod_sc = spec.get("securityContext") or {}
    for i, volume in enumerate(spec.get("volumes") or []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            out.append(f"volume types: volumes[{i}] is {sorted(kinds - RESTRICTED_VOLUMES)}")
    pod_non_root = pod_sc.get("runAsNonRoot") is True
    pod_seccomp = _seccomp_type(pod_sc) in ("RuntimeDefault", "Localhost")
    if pod_sc.get("runAsUser") == 0:
        out.append("running as non-root user: securityContext.runAsUser must not be 0")
    for where, container in _containers(spec):
        sc = container.get("securityContext") or {}
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"privilege escalation: {where}.securityContext.allowPrivilegeEscalation"
                       " must be false")
        if sc.get("runAsNonRoot") is False or not (pod_non_root or sc.get("runAsNonRoot")):
            out.append(f"running as non-root: {where} must set runAsNonRoot true (or the pod)")
        if sc.get("runAsUser") == 0:
            out.append(f"running as non-root user: {where}.securityContext.runAsUser is 0")
        seccomp = _seccomp_type(sc)
        if not (seccomp in ("RuntimeDefault", "Localhost") or (seccomp is None and pod_seccomp)):
            out.append(f"seccomp: {where} needs seccompProfile RuntimeDefault or Localhost "
                       "(or the pod's)")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"capabilities: {where} must drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"capabilities: {where} may add only NET_BIND_SERVICE")
    return out


def hardening_gaps(spec: dict[str, Any], needs_api: bool) -> list[str]:
    """Beyond "restricted": a read-only root filesystem, and no API token unless needed."""
    out = []
    for where, container in _containers(spec):
        if (container.get("securityContext") or {}).get("readOnlyRootFilesystem") is not True:
            out.append(f"{where}: readOnlyRootFilesystem must be true")
    if not needs_api and spec.get("automountServiceAccountToken") is not False:
        out.append("automountServiceAccountToken must be false (no API access needed)")
    return out


def pod_specs(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, pod spec) of every pod template in a rendered object."""
    kind, name = obj.get("kind"), (obj.get("metadata") or {}).get("name", "?")
    if kind == "Pod":
        return [(name, obj["spec"])]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "Service"):
        template = (obj.get("spec") or {}).get("template")
        if template and "spec" in template:  # a Knative Service has one; a core one not
            return [(f"{kind}/{name}", template["spec"])]
    if kind == "CronJob":
        return [(name, obj["spec"]["jobTemplate"]["spec"]["template"]["spec"])]
    return []
