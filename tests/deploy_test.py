"""The Kubernetes manifests in deploy/ (no cluster here): they parse, and the
fields that must agree between the stmuxd DaemonSet and a tenant pod do: the
socket's path, the preload library's, the daemon's uid and group, the IPC
namespace, and only stmux variables that exist; for stmux on MPS also the
MPS control daemon's sidecar, its pipe directory as all three see it, and
one uid for daemon and tenants. Run by ctest:
`python3 tests/deploy_test.py SOURCE_DIR`."""
import os
import re
import sys
import unittest

import yaml

SOURCE = None


def load(name):
    with open(os.path.join(SOURCE, "deploy", name)) as f:
        return list(yaml.safe_load_all(f))


def env(container):
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def mounts(pod_spec, container):
    """mountPath -> (host path, read-only) for the container's hostPath volumes."""
    host = {v["name"]: v["hostPath"]["path"] for v in pod_spec.get("volumes", [])
            if "hostPath" in v}
    return {m["mountPath"]: (host[m["name"]], m.get("readOnly", False))
            for m in container.get("volumeMounts", []) if m["name"] in host}


def host_path(pod_spec, container, path):
    """Where `path` inside the container lives on the node, or None."""
    for mount, (host, _) in mounts(pod_spec, container).items():
        if path == mount or path.startswith(mount.rstrip("/") + "/"):
            return host + path[len(mount):]
    return None


class Deploy(unittest.TestCase):
    """stmuxd alone (tenants of any uid in the stmux group)."""
    DAEMONSET = "stmuxd-daemonset.yaml"
    TENANT = "tenant-pod.yaml"
    MPS = False

    @classmethod
    def setUpClass(cls):
        docs = load(cls.DAEMONSET)
        cls.daemonset = next(d for d in docs if d["kind"] == "DaemonSet")
        cls.daemon_pod = cls.daemonset["spec"]["template"]["spec"]
        cls.daemon = next(c for c in cls.daemon_pod["containers"] if c["name"] == "stmuxd")
        cls.tenant_pod = next(d for d in load(cls.TENANT) if d["kind"] == "Pod")["spec"]
        cls.tenant = cls.tenant_pod["containers"][0]
        with open(os.path.join(SOURCE, "README.md")) as f:
            cls.known = set(re.findall(r"^\| `(STMUX_[A-Z_]+)` \|", f.read(), re.M))

    def test_every_document_names_its_kind_and_api(self):
        for name in (self.DAEMONSET, self.TENANT):
            for doc in load(name):
                self.assertIn("apiVersion", doc, name)
                self.assertIn("kind", doc, name)
                self.assertIn("name", doc["metadata"], name)
        labels = self.daemonset["spec"]["template"]["metadata"]["labels"]
        for key, value in self.daemonset["spec"]["selector"]["matchLabels"].items():
            self.assertEqual(labels.get(key), value, "the selector must match the pods")

    def test_the_tenant_reaches_the_daemons_socket(self):
        socket = env(self.daemon)["STMUX_SOCKET"]
        node_socket = host_path(self.daemon_pod, self.daemon, socket)
        self.assertIsNotNone(node_socket, "the daemon's socket is not on a hostPath volume")
        tenant_socket = env(self.tenant)["STMUX_SOCKET"]
        self.assertEqual(host_path(self.tenant_pod, self.tenant, tenant_socket), node_socket)
        for probe in ("readinessProbe", "livenessProbe"):
            command = self.daemon[probe]["exec"]["command"]
            self.assertIn("stmuxctl", command[0])
            self.assertEqual(command[command.index("--socket") + 1], socket, probe)

    def test_the_tenant_preloads_the_library_the_daemonset_installs(self):
        preload = env(self.tenant)["LD_PRELOAD"]
        node_library = host_path(self.tenant_pod, self.tenant, preload)
        self.assertIsNotNone(node_library, "LD_PRELOAD is not on a hostPath volume")
        init = self.daemon_pod["initContainers"][0]
        installed = " ".join(init["command"])
        target = next(m for m in init["volumeMounts"])["mountPath"]
        node_installed = host_path(self.daemon_pod, init,
                                   re.search(re.escape(target) + r"\S*libstmux\.so",
                                             installed).group(0))
        self.assertEqual(node_library, node_installed)
        for host, read_only in mounts(self.tenant_pod, self.tenant).values():
            if host not in self.tenant_may_write():
                self.assertTrue(read_only, f"a tenant must not be able to write {host}")

    def tenant_may_write(self):
        """The node paths a tenant may mount writable: none of the daemon's."""
        return set()

    def test_identities_agree(self):
        daemon = self.daemon_pod["securityContext"]
        init = " ".join(self.daemon_pod["initContainers"][0]["command"])
        self.assertIn(f"-o {daemon['runAsUser']} -g {daemon['runAsGroup']}", init)
        if self.MPS:
            # MPS serves one user at a time: the tenant is the daemon's user,
            # whom its shim trusts without STMUX_DAEMON_USER.
            tenant = self.tenant_pod["securityContext"]
            self.assertEqual(tenant["runAsUser"], daemon["runAsUser"])
            self.assertEqual(tenant["runAsGroup"], daemon["runAsGroup"])
            self.assertNotIn("STMUX_DAEMON_USER", env(self.tenant))
            return
        self.assertTrue(daemon["runAsNonRoot"])
        # The tenant's shim attaches only to its daemon's uid ...
        self.assertEqual(env(self.tenant)["STMUX_DAEMON_USER"], str(daemon["runAsUser"]))
        # ... and may connect only as a member of its group (socket 0660).
        self.assertIn(daemon["runAsGroup"],
                      self.tenant_pod["securityContext"]["supplementalGroups"])

    def test_namespaces_and_devices(self):
        self.assertTrue(self.daemon_pod["hostIPC"], "CUDA IPC between the pods")
        self.assertTrue(self.tenant_pod["hostIPC"], "CUDA IPC between the pods")
        self.assertTrue(self.daemon_pod["hostPID"], "pids that stmuxctl can name")
        self.assertEqual(env(self.daemon)["NVIDIA_VISIBLE_DEVICES"], "all")
        self.assertNotIn("nvidia.com/gpu", self.daemon.get("resources", {}).get("limits", {}),
                         "the daemon must not take the tenants' GPUs from the device plugin")
        self.assertIn("nvidia.com/gpu", self.tenant["resources"]["limits"])

    def test_the_daemon_container_is_locked_down_yet_can_work(self):
        security = self.daemon["securityContext"]
        self.assertFalse(security["allowPrivilegeEscalation"])
        self.assertEqual(security["capabilities"]["drop"], ["ALL"])
        self.assertTrue(security["readOnlyRootFilesystem"])
        cache = env(self.daemon)["CUDA_CACHE_PATH"]
        writable = [m["mountPath"] for m in self.daemon["volumeMounts"]]
        self.assertTrue(any(cache.startswith(m) for m in writable),
                        "CUDA's JIT cache needs a writable volume")
        self.assertIn("memory", self.daemon["resources"]["limits"])
        metrics = env(self.daemon)["STMUX_METRICS_FILE"]
        self.assertIsNotNone(host_path(self.daemon_pod, self.daemon, metrics))

    def test_only_stmux_variables_that_exist(self):
        for container in (self.daemon, self.tenant):
            for name in env(container):
                if name.startswith("STMUX_"):
                    self.assertIn(name, self.known, f"{name} is not in the README's table")


class DeployMps(Deploy):
    """stmux on MPS: the MPS control daemon beside stmuxd, one user for all."""
    DAEMONSET = "stmuxd-daemonset-mps.yaml"
    TENANT = "tenant-pod-mps.yaml"
    MPS = True

    def tenant_may_write(self):
        """MPS's pipe directory: its clients talk to its server there."""
        pipes = env(self.daemon)["CUDA_MPS_PIPE_DIRECTORY"]
        return {host_path(self.daemon_pod, self.daemon, pipes)}

    def test_mps_starts_before_stmuxd_and_all_three_share_its_pipes(self):
        inits = self.daemon_pod["initContainers"]
        names = [c["name"] for c in inits]
        self.assertEqual(names[0], "prepare-run-stmux", "the directory exists first")
        sidecar = next(c for c in inits if c["command"][0] == "nvidia-cuda-mps-control")
        # A sidecar: it keeps running, and stmuxd starts once its probe passes.
        self.assertEqual(sidecar.get("restartPolicy"), "Always")
        self.assertEqual(sidecar["command"][1:], ["-f"], "in the foreground, as a container must")
        self.assertIn("startupProbe", sidecar)
        pipes = env(sidecar)["CUDA_MPS_PIPE_DIRECTORY"]
        self.assertIn(pipes, " ".join(sidecar["startupProbe"]["exec"]["command"]))
        node_pipes = host_path(self.daemon_pod, sidecar, pipes)
        self.assertIsNotNone(node_pipes, "MPS's pipes are not on the node")
        self.assertEqual(host_path(self.daemon_pod, self.daemon,
                                   env(self.daemon)["CUDA_MPS_PIPE_DIRECTORY"]), node_pipes)
        tenant_pipes = env(self.tenant)["CUDA_MPS_PIPE_DIRECTORY"]
        self.assertEqual(host_path(self.tenant_pod, self.tenant, tenant_pipes), node_pipes)
        self.assertIn(pipes, " ".join(inits[0]["command"]), "the directory must be made")
        self.assertIn("compute", env(sidecar)["NVIDIA_DRIVER_CAPABILITIES"],
                      "the runtime brings nvidia-cuda-mps-control with 'compute'")


if __name__ == "__main__":
    SOURCE = sys.argv.pop(1)
    unittest.main()
