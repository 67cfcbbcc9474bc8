//! A process's container context — container id, Kubernetes pod UID, runtime — from the paths
//! in its `/proc/<pid>/cgroup`. Pure: text in, [`CgroupContext`] out; no I/O, never panics.
//!
//! The shapes it knows, and where each comes from:
//! - kubelet (`pkg/kubelet/cm`, `cgroup_manager_linux.go`, `pod_container_manager_linux.go`):
//!   a pod's cgroup name is `[<cgroup-root>…, kubepods, <qos>, pod<uid>]`, the QoS level absent
//!   for Guaranteed pods. The cgroupfs driver joins it as a path
//!   (`/kubepods/burstable/pod<uid>`); the systemd driver replaces `-` by `_` in each part
//!   (`escapeSystemdCgroupName`) and nests slices whose names repeat their parents'
//!   (`/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_with_underscores>.slice`,
//!   `kubelet.slice/kubelet-kubepods.slice/…` under kind's cgroup root `/kubelet`).
//!   Pod UIDs are UUIDs, except static pods' (kube-apiserver, etcd…): the kubelet names them
//!   with the MD5 of the manifest in hex, 32 digits without dashes (`pkg/kubelet/config`,
//!   `applyDefaults`). Both shapes are accepted.
//! - The runtime names the container's cgroup below the pod's (or below its own parent):
//!   as a systemd scope `<prefix>-<id>.scope` under the systemd driver (runc and crun expand
//!   the OCI `cgroupsPath` `slice:prefix:id`), as `<id>` or `<prefix>-<id>` under cgroupfs.
//!   Prefixes: `cri-containerd` (containerd's CRI plugin), `crio` (CRI-O, `crio-<id>` under
//!   cgroupfs too), `docker` (dockerd, and cri-dockerd under kubelet), `libpod` (podman:
//!   `machine.slice` rootful, the user's `user.slice` rootless, `/libpod_parent/libpod-<id>`
//!   under cgroupfs), `nerdctl` (nerdctl on containerd, systemd driver). Bare ids:
//!   dockerd's cgroupfs `/docker/<id>`, containerd's default `/<namespace>/<id>`
//!   (`/default/<id>` for ctr and nerdctl), containerd and cri-dockerd below a cgroupfs pod.
//! - crun places the container's processes one level down (`crio-<id>.scope/container`,
//!   `libpod-<id>.scope/container`) and a container running systemd has its own `init.scope`
//!   and units below its scope: whatever lies below the innermost container is skipped.
//! - Not containers: the conmon monitors CRI-O and podman start beside each container
//!   (`crio-conmon-<id>.scope`, `libpod-conmon-<id>.scope`), and containerd's shims, which
//!   stay in `containerd.service`.
//! - A kubelet using the systemd driver with containerd's runc left on cgroupfs
//!   (`SystemdCgroup = false`) gets the `slice:prefix:id` string taken as a relative path
//!   under the shim's cgroup: `/system.slice/containerd.service/<pod>.slice:cri-containerd:<id>`
//!   (kubernetes/kubernetes#106514). Read as the pod slice, then the container.
//!
//! The kernel renders each path relative to the *reader's* cgroup namespace
//! (`proc_cgroup_show` → `cgroup_path_ns_locked`): an agent in a private one (a
//! non-privileged pod on cgroup v2, as the DaemonSet is) sees `/../../<rest>`. systemd slice
//! names carry their whole ancestry, so the pod survives; for a cgroupfs `pod<uid>` whose
//! `kubepods` ancestor is hidden above a `..`, a well-formed UID is still taken. A cgroup
//! removed while a zombie still names it gets ` (deleted)` appended (cgroup v2 only).
//!
//! The container's *name* is in no runtime's cgroup path: it needs the runtime's API (or the
//! pod spec, from the UID), so it is not guessed here.
//!
//! [`crate::owners::procs::container_id`] gives the same container id for every path, except
//! the conmon scopes (its id there is the monitored container's, though conmon is not in it),
//! the `slice:prefix:id` and ` (deleted)` shapes (it finds no id), and a process in a pod slice
//! nested inside an outer container (this module reports the pod; see [`parse`]).

/// A container runtime, as told by the cgroup naming convention that matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Runtime {
    /// dockerd, standalone or behind cri-dockerd (`docker-<id>.scope`, `/docker/<id>`).
    Docker,
    /// containerd: its CRI plugin (`cri-containerd-<id>.scope`), nerdctl
    /// (`nerdctl-<id>.scope`), or its default namespace (`/default/<id>`).
    Containerd,
    /// CRI-O (`crio-<id>.scope`, `crio-<id>`).
    CriO,
    /// podman (`libpod-<id>.scope`, `libpod-<id>`).
    Podman,
}

impl Runtime {
    /// The runtime's usual lowercase name, for labels and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Docker => "docker",
            Runtime::Containerd => "containerd",
            Runtime::CriO => "cri-o",
            Runtime::Podman => "podman",
        }
    }

    /// The runtime that names its containers' cgroups `<prefix>-<id>`.
    fn from_prefix(prefix: &str) -> Option<Self> {
        match prefix {
            "docker" => Some(Runtime::Docker),
            "cri-containerd" | "nerdctl" => Some(Runtime::Containerd),
            "crio" => Some(Runtime::CriO),
            "libpod" => Some(Runtime::Podman),
            _ => None,
        }
    }

    /// The runtime that puts bare `<id>` cgroups under a parent named `parent`.
    fn from_parent(parent: &str) -> Option<Self> {
        match parent {
            "docker" => Some(Runtime::Docker),
            // containerd's default `/<namespace>/<id>` in the namespace ctr and nerdctl use.
            "default" => Some(Runtime::Containerd),
            _ => None,
        }
    }
}

/// What a process's cgroup path says about where it runs. All `None`: a host process (or a
/// shape this module does not know).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupContext {
    /// The innermost container's id: 64 hex digits, as the runtime's API names it.
    pub container_id: Option<String>,
    /// The Kubernetes pod's UID, with dashes (`metadata.uid`): a UUID, or 32 hex digits for a
    /// static pod. `None` outside a pod, and when the pod's cgroup name is malformed.
    pub pod_uid: Option<String>,
    /// The runtime that named the container's cgroup; `None` without a container, and when
    /// the name does not tell (cgroupfs pods hold bare ids from containerd and cri-dockerd
    /// alike, and an unknown `<prefix>-<id>` is still a container).
    pub runtime: Option<Runtime>,
}

impl CgroupContext {
    /// Whether the path named neither a container nor a pod.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.container_id.is_none() && self.pod_uid.is_none()
    }
}

/// One level of a cgroup path, as far as this module cares.
enum Level<'a> {
    /// A container's own cgroup.
    Container {
        id: &'a str,
        runtime: Option<Runtime>,
    },
    /// A pod's cgroup: its UID with dashes, `None` if malformed.
    Pod(Option<String>),
    /// Anything else: slices, services, `init.scope`, conmon scopes, `..`.
    Other,
}

/// The context of one cgroup path (the third field of a `/proc/<pid>/cgroup` line).
///
/// The innermost container wins, with the innermost pod above it (nested runtimes: kind and
/// minikube nodes are containers holding pods). A process in a pod's cgroup but in none of its
/// containers (a conmon, or a pod-level process) gets the pod alone, even when an outer
/// container holds that pod: the pod is the workload it belongs to. A pod whose cgroup name
/// is malformed gives no UID (never an outer pod's). Garbage gives an empty context.
pub fn parse(path: &str) -> CgroupContext {
    let path = path.strip_suffix(" (deleted)").unwrap_or(path);
    let mut walk = Walk::default();
    let mut container = None;
    let mut pod: Option<String> = None;
    // Whether the innermost pod lies below the innermost container.
    let mut pod_below = false;
    for part in path.split('/').flat_map(parts).flatten() {
        match walk.level(part) {
            Level::Container { id, runtime } => {
                container = Some((id, runtime));
                pod_below = false;
            }
            Level::Pod(uid) => {
                pod = uid;
                pod_below = container.is_some();
            }
            Level::Other => {}
        }
    }
    match container {
        Some((id, runtime)) if !pod_below => CgroupContext {
            container_id: Some(id.to_owned()),
            pod_uid: pod,
            runtime,
        },
        _ => CgroupContext {
            pod_uid: pod,
            ..CgroupContext::default()
        },
    }
}

/// The context of a process from its cgroup v2 path (`0::<path>`) and its cgroup v1 paths
/// (the other lines), in the file's order. The first path that names a container gives the
/// whole context (paths are never mixed); without one, the first that names a pod. On a
/// hybrid host the unified path can name no container while the v1 ones do (a runtime that
/// does not join the unified hierarchy leaves the container in its shim's cgroup there).
pub fn context<'a>(
    unified: Option<&'a str>,
    v1_paths: impl IntoIterator<Item = &'a str>,
) -> CgroupContext {
    let mut pod_only = CgroupContext::default();
    for path in unified.into_iter().chain(v1_paths) {
        let ctx = parse(path);
        if ctx.container_id.is_some() {
            return ctx;
        }
        if pod_only.pod_uid.is_none() && ctx.pod_uid.is_some() {
            pod_only = ctx;
        }
    }
    pod_only
}

/// The context of a process from the whole text of its `/proc/<pid>/cgroup`
/// (`hierarchy-id:controllers:path` lines; [`context`] over its unified and v1 paths). Lines
/// that are not of that form are ignored.
pub fn from_proc_cgroup(text: &str) -> CgroupContext {
    let v1 = text
        .lines()
        .filter_map(line)
        .filter(|(unified, _)| !unified)
        .map(|(_, path)| path);
    context(unified_path(text), v1)
}

/// The cgroup v2 path in the text of a `/proc/<pid>/cgroup` (its `0::` line), as the kernel
/// wrote it; `None` on a cgroup v1 host.
pub fn unified_path(text: &str) -> Option<&str> {
    text.lines()
        .filter_map(line)
        .find_map(|(unified, path)| unified.then_some(path))
}

/// A `/proc/<pid>/cgroup` line: whether it is the unified (v2) hierarchy's, and its path. The
/// path is the rest of the line: it may hold `:` itself (`slice:prefix:id`).
fn line(line: &str) -> Option<(bool, &str)> {
    let mut fields = line.splitn(3, ':');
    let (hierarchy, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
    Some((hierarchy == "0" && controllers.is_empty(), path))
}

/// A component of a path, or half of one.
enum Part<'a> {
    /// A cgroup's directory name.
    Name(&'a str),
    /// The container half of a `<slice>:<prefix>:<id>` name.
    Scoped { prefix: &'a str, id: &'a str },
}

/// A path component as one or two parts: `<pod>.slice:cri-containerd:<id>` (an OCI
/// `cgroupsPath` for the systemd driver, taken literally by a cgroupfs runc) is the pod's
/// slice, then the container in it.
fn parts(name: &str) -> [Option<Part<'_>>; 2] {
    if let Some((slice, rest)) = name.split_once(':')
        && let Some((prefix, id)) = rest.split_once(':')
        && slice.ends_with(".slice")
        && !id.contains(':')
    {
        return [Some(Part::Name(slice)), Some(Part::Scoped { prefix, id })];
    }
    [Some(Part::Name(name)), None]
}

/// What the walk down a path has seen so far.
#[derive(Default)]
struct Walk<'a> {
    /// The previous directory name (a bare id's parent names its runtime).
    parent: &'a str,
    /// A `kubepods` level was passed: `pod<uid>` below it is a cgroupfs pod.
    kubepods: bool,
    /// A `..` was passed: the path starts outside the reader's cgroup namespace, so a
    /// `kubepods` level may be hidden above it.
    outside: bool,
}

impl<'a> Walk<'a> {
    /// Classifies the next part of the path.
    fn level(&mut self, part: Part<'a>) -> Level<'a> {
        match part {
            Part::Scoped { prefix, id } => container(prefix, id).unwrap_or(Level::Other),
            Part::Name(name) => {
                let level = self.name(name);
                self.parent = name;
                level
            }
        }
    }

    /// Classifies a directory name, noting the ancestors that later names depend on.
    fn name(&mut self, name: &'a str) -> Level<'a> {
        // A container first: the rule `procs::container_id` applies, so ids agree.
        let unit = name.strip_suffix(".scope").unwrap_or(name);
        match unit.rsplit_once('-') {
            Some((prefix, id)) => {
                if let Some(level) = container(prefix, id) {
                    return level;
                }
            }
            None if is_container_id(unit) => {
                return Level::Container {
                    id: unit,
                    runtime: Runtime::from_parent(self.parent),
                };
            }
            None => {}
        }
        if name == ".." {
            self.outside = true;
        } else if name == "kubepods" {
            self.kubepods = true;
        } else if let Some(stem) = name.strip_suffix(".slice") {
            // systemd driver: `[<root>-]kubepods[-<qos>]-pod<uid_with_underscores>.slice`.
            if let Some((ancestry, last)) = stem.rsplit_once('-')
                && let Some(uid) = last.strip_prefix("pod")
                && ancestry.split('-').any(|p| p == "kubepods")
            {
                let uid = uid.replace('_', "-");
                return Level::Pod(is_pod_uid(&uid).then_some(uid));
            }
        } else if let Some(uid) = name.strip_prefix("pod") {
            // cgroupfs driver: `…/kubepods[/<qos>]/pod<uid>`.
            if self.kubepods {
                return Level::Pod(is_pod_uid(uid).then(|| uid.to_owned()));
            }
            if self.outside && is_pod_uid(uid) {
                return Level::Pod(Some(uid.to_owned()));
            }
        }
        Level::Other
    }
}

/// The level of a `<prefix>-<id>` name, if `id` is a container id: a container, or nothing for
/// a conmon monitor (`crio-conmon-<id>`, `libpod-conmon-<id>`), which is not in the container.
fn container<'a>(prefix: &str, id: &'a str) -> Option<Level<'a>> {
    if !is_container_id(id) {
        return None;
    }
    if prefix == "conmon" || prefix.ends_with("-conmon") {
        return Some(Level::Other);
    }
    Some(Level::Container {
        id,
        runtime: Runtime::from_prefix(prefix),
    })
}

/// A container id as runtimes write it: 64 hex digits (SHA-256).
fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A pod UID: a UUID (8-4-4-4-12 hex digits), or the 32 hex digits of a static pod's.
fn is_pod_uid(s: &str) -> bool {
    let b = s.as_bytes();
    match b.len() {
        32 => b.iter().all(u8::is_ascii_hexdigit),
        36 => b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        }),
        _ => false,
    }
}

#[cfg(test)]
mod tests;
