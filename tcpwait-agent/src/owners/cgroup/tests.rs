//! Tests of the cgroup → container context mapping over whole `/proc/<pid>/cgroup` files as
//! each runtime and cgroup driver leaves them (`tests/fixtures/cgroup/`, whose README says
//! where each shape comes from), plus hand-made malformed paths.
use std::collections::BTreeSet;

use super::*;

/// A fixture's text, by file stem.
macro_rules! fixture {
    ($name:literal) => {
        (
            $name,
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/cgroup/",
                $name,
                ".cgroup"
            )),
        )
    };
}

// The ids the fixtures use.
const ID0: &str = "04c642c4aad24b9664a4e658a96e17f01ad153401700b9476b1948ef147bdbfa";
const ID1: &str = "fa5d6657c4bce44e5193621850164115f31b7edf60ecdd3112b87b232786264b";
const ID2: &str = "c6f9192c68e11323069c62dcb0ac86e0a7afb9810db582d7dbe95451be8b8a3a";
const ID3: &str = "a6bbe88719990bd96d0fa6057db799771545cc76bdbca3b760bb1a02a72f7168";
const ID4: &str = "d36101b09a8c986089518a5a2241af4f6e1ab35d4db9a9af5a6717a9fd4c115f";
const ID5: &str = "18188898fe55bbd011338e7bf69874f6767c4ccdd5e68bb87b5e3037675a0f5c";
const ID6: &str = "9aedd8626af94c278c8ba233146bbfba5c72fc024fa051e91c4cc23b17412ce8";
const ID7: &str = "a3382d48dce307f6ac750a7ed89b1582f3e4b2474d441612e0433b06cccfaa03";
const ID8: &str = "56a89b92e6e7901ac96f7d8fe805b67a880fa685edc5f22de917db32f15de926";
const ID9: &str = "11bf0d9f611063f550f520af7527b73bac8e235fb2924bf1ba6c0b58a51255c9";
const ID10: &str = "09eb5e94445c00a96c6bb59c13730c14f435b551aee373abba67b66f5de780c2";
const ID11: &str = "5500ca81e974c33602c77753c2f5d93b2165df2f5d74e5f7f5abd7e7c454384c";
const ID12: &str = "ec920ab52b9df703c4f1ce5e44199c5256c0928ab2554f0cc0ed13b9e73b223c";
const ID13: &str = "32b2161d657080671b81d32cf5c995ace814e94dbff136c07b92f53da4dd14ca";
const UID0: &str = "bcd420fc-3072-4a75-ba98-0a4b2b439533";
const UID1: &str = "2792948f-f6ca-4171-a1fd-7f4e1857c471";
const UID2: &str = "7dd777b0-f11d-4418-99a6-7c8fa3428ce8";
const UID3: &str = "2daa3f83-f980-470e-aead-4fe0a2af9e95";
const UID4: &str = "7e4f9915-0474-4c74-ade6-44229d552534";
const UID5: &str = "ad8cd082-9a90-457b-ac37-3cc3f1f646e8";
const UID6: &str = "7f6733ee-ec9f-48ac-b893-9bde4acdc599";
const UID7: &str = "98a49506-79b0-4868-8004-ceb0bcd0769e";
const STATIC_UID: &str = "9a81aaa681b05fd21ccd93687dc25cbf";

use Runtime::{Containerd, CriO, Docker, Podman};

/// The expected context.
fn ctx(container: Option<&str>, pod: Option<&str>, runtime: Option<Runtime>) -> CgroupContext {
    CgroupContext {
        container_id: container.map(str::to_owned),
        pod_uid: pod.map(str::to_owned),
        runtime,
    }
}

/// Every fixture and the context its file must give.
fn cases() -> Vec<((&'static str, &'static str), CgroupContext)> {
    vec![
        // kubelet, systemd driver.
        (
            fixture!("k8s-systemd-containerd-burstable"),
            ctx(Some(ID0), Some(UID0), Some(Containerd)),
        ),
        (
            fixture!("k8s-systemd-containerd-besteffort"),
            ctx(Some(ID1), Some(UID1), Some(Containerd)),
        ),
        (
            fixture!("k8s-systemd-containerd-guaranteed"),
            ctx(Some(ID2), Some(UID2), Some(Containerd)),
        ),
        (
            fixture!("k8s-systemd-static-pod"),
            ctx(Some(ID3), Some(STATIC_UID), Some(Containerd)),
        ),
        (
            fixture!("k8s-systemd-crio"),
            ctx(Some(ID4), Some(UID3), Some(CriO)),
        ),
        // conmon is in the pod's slice, not in the container it monitors.
        (
            fixture!("k8s-systemd-crio-conmon"),
            ctx(None, Some(UID3), None),
        ),
        (
            fixture!("k8s-systemd-cri-dockerd-v1"),
            ctx(Some(ID5), Some(UID4), Some(Docker)),
        ),
        // kubelet, cgroupfs driver: the bare id does not say which runtime.
        (
            fixture!("k8s-cgroupfs-burstable-v1"),
            ctx(Some(ID6), Some(UID5), None),
        ),
        (
            fixture!("k8s-cgroupfs-besteffort"),
            ctx(Some(ID7), Some(UID6), None),
        ),
        (
            fixture!("k8s-cgroupfs-guaranteed"),
            ctx(Some(ID8), Some(UID7), None),
        ),
        (
            fixture!("k8s-cgroupfs-hybrid-shim-unified"),
            ctx(Some(ID6), Some(UID5), None),
        ),
        (
            fixture!("k8s-containerd-driver-mismatch-v1"),
            ctx(Some(ID9), Some(STATIC_UID), Some(Containerd)),
        ),
        // Read from inside a pod's own cgroup namespace.
        (
            fixture!("k8s-systemd-seen-from-pod-cgroupns"),
            ctx(Some(ID1), Some(UID1), Some(Containerd)),
        ),
        (
            fixture!("k8s-cgroupfs-seen-from-pod-cgroupns"),
            ctx(Some(ID7), Some(UID6), None),
        ),
        (
            fixture!("host-seen-from-pod-cgroupns"),
            ctx(None, None, None),
        ),
        // Docker alone.
        (
            fixture!("docker-systemd"),
            ctx(Some(ID10), None, Some(Docker)),
        ),
        (
            fixture!("docker-systemd-hybrid"),
            ctx(Some(ID10), None, Some(Docker)),
        ),
        (
            fixture!("docker-cgroupfs-v1"),
            ctx(Some(ID11), None, Some(Docker)),
        ),
        (
            fixture!("docker-systemd-init-scope"),
            ctx(Some(ID10), None, Some(Docker)),
        ),
        // Nested: the innermost container, the pod from the kubepods part.
        (
            fixture!("kind-node-pod"),
            ctx(Some(ID0), Some(UID0), Some(Containerd)),
        ),
        (
            fixture!("kind-node-kubelet"),
            ctx(Some(ID12), None, Some(Docker)),
        ),
        (
            fixture!("nested-docker-kubepods-v1"),
            ctx(Some(ID7), Some(UID6), None),
        ),
        // A conmon inside a minikube node: its pod, not the node's container.
        (
            fixture!("minikube-crio-conmon-v1"),
            ctx(None, Some(UID3), None),
        ),
        // containerd without Kubernetes.
        (
            fixture!("nerdctl-cgroupfs"),
            ctx(Some(ID3), None, Some(Containerd)),
        ),
        (
            fixture!("nerdctl-systemd"),
            ctx(Some(ID3), None, Some(Containerd)),
        ),
        (fixture!("containerd-shim"), ctx(None, None, None)),
        // podman: a podman pod is not a Kubernetes pod.
        (
            fixture!("podman-rootful"),
            ctx(Some(ID5), None, Some(Podman)),
        ),
        (
            fixture!("podman-rootless"),
            ctx(Some(ID5), None, Some(Podman)),
        ),
        (fixture!("podman-conmon"), ctx(None, None, None)),
        (fixture!("podman-pod"), ctx(Some(ID9), None, Some(Podman))),
        (
            fixture!("podman-cgroupfs-v1"),
            ctx(Some(ID2), None, Some(Podman)),
        ),
        // Host processes.
        (fixture!("host-sshd"), ctx(None, None, None)),
        (fixture!("host-user-session"), ctx(None, None, None)),
        (fixture!("host-v1"), ctx(None, None, None)),
    ]
}

#[test]
fn every_fixture_gives_its_exact_context() {
    for ((name, text), want) in cases() {
        assert_eq!(from_proc_cgroup(text), want, "{name}");
    }
}

#[test]
fn every_fixture_file_has_a_case() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/cgroup");
    let files: BTreeSet<String> = std::fs::read_dir(dir)
        .expect("fixture directory")
        .map(|e| e.expect("fixture entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cgroup"))
        .map(|p| {
            let stem = p.file_stem().expect("a .cgroup file has a stem");
            stem.to_string_lossy().into_owned()
        })
        .collect();
    let cased: BTreeSet<String> = cases().iter().map(|((n, _), _)| n.to_string()).collect();
    assert_eq!(files, cased);
    assert_eq!(files.len(), 34);
}

#[test]
fn the_unified_path_is_the_0_line_as_written() {
    let (_, text) = fixture!("docker-systemd-hybrid");
    assert_eq!(
        unified_path(text),
        Some(&*format!("/system.slice/docker-{ID10}.scope"))
    );
    let (_, text) = fixture!("docker-cgroupfs-v1");
    assert_eq!(unified_path(text), None, "a cgroup v1 host has no 0:: line");
    let (_, text) = fixture!("k8s-systemd-seen-from-pod-cgroupns");
    assert_eq!(
        unified_path(text),
        Some(&*format!(
            "/../../kubepods-besteffort.slice/kubepods-besteffort-pod2792948f_f6ca_4171_a1fd_7f4e1857c471.slice/cri-containerd-{ID1}.scope"
        ))
    );
    assert_eq!(unified_path("0::/\n"), Some("/"));
    assert_eq!(unified_path("1:name=systemd:/x\n"), None);
    assert_eq!(unified_path(""), None);
}

/// The container id cases the agent handled before this module, unchanged.
#[test]
fn procs_container_id_cases_are_reproduced() {
    let id = ID0;
    let cases = [
        (format!("/system.slice/docker-{id}.scope"), Some(id)),
        (
            format!("/kubepods.slice/kubepods-pod1.slice/cri-containerd-{id}.scope"),
            Some(id),
        ),
        (format!("/docker/{id}"), Some(id)),
        (format!("/kubepods/besteffort/pod0f3c/{id}"), Some(id)),
        (
            format!("/machine.slice/libpod-{id}.scope/init.scope"),
            Some(id),
        ),
        (format!("/docker/{}", &id[..63]), None),
        (format!("/docker/{}x", &id[..63]), None),
        ("/user.slice/user-0.slice/session-1.scope".to_owned(), None),
        ("/".to_owned(), None),
        (String::new(), None),
    ];
    for (path, want) in cases {
        assert_eq!(parse(&path).container_id.as_deref(), want, "{path}");
    }
}

#[test]
fn systemd_pod_uids_come_back_with_dashes() {
    let path = format!(
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
        UID0.replace('-', "_")
    );
    // A process in the pod's slice but in no container of it.
    assert_eq!(parse(&path), ctx(None, Some(UID0), None));
    let guaranteed = format!(
        "/kubepods.slice/kubepods-pod{}.slice",
        UID2.replace('-', "_")
    );
    assert_eq!(parse(&guaranteed), ctx(None, Some(UID2), None));
    // The QoS slices alone are not pods.
    assert_eq!(
        parse("/kubepods.slice/kubepods-besteffort.slice"),
        CgroupContext::default()
    );
}

#[test]
fn a_malformed_pod_uid_is_no_pod_never_a_panic() {
    let bad = [
        "NOTAUUID",
        "",
        "bcd420fc_3072_4a75_ba98_0a4b2b43953", // 35 characters
        "bcd420fc_3072_4a75_ba98_0a4b2b4395333", // 37
        "bcd420fc3_072_4a75_ba98_0a4b2b439533", // groups shifted
        "bcd420fc_3072_4a75_ba98_0a4b2b43953g", // not hex
        "9a81aaa681b05fd21ccd93687dc25cb",     // 31 hex digits
        "9a81aaa681b05fd21ccd93687dc25cbff",   // 33
        "ünïcödé",
    ];
    for uid in bad {
        let systemd = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice/cri-containerd-{ID0}.scope"
        );
        assert_eq!(
            parse(&systemd),
            ctx(Some(ID0), None, Some(Containerd)),
            "{systemd}"
        );
        let cgroupfs = format!("/kubepods/burstable/pod{}/{ID0}", uid.replace('_', "-"));
        assert_eq!(parse(&cgroupfs), ctx(Some(ID0), None, None), "{cgroupfs}");
    }
    // The malformed inner pod is the pod: the outer one is not taken instead.
    let nested = format!("/kubepods/pod{UID0}/{ID1}/kubepods/podNOTAUUID/{ID0}");
    assert_eq!(parse(&nested), ctx(Some(ID0), None, None));
}

#[test]
fn pod_uid_shapes() {
    assert!(is_pod_uid(UID0));
    assert!(is_pod_uid(STATIC_UID));
    assert!(is_pod_uid(&UID0.to_uppercase()));
    assert!(!is_pod_uid(&UID0.replace('-', "_")));
    assert!(!is_pod_uid(&UID0.replace('-', "")[..31]));
    assert!(!is_pod_uid(&format!("{UID0}0")));
    assert!(!is_pod_uid("bcd420fc-3072-4a75-ba98-0a4b2b43953-"));
    assert!(!is_pod_uid(""));
}

#[test]
fn container_ids_are_exactly_64_hex_digits() {
    for path in [
        format!("/system.slice/docker-{}.scope", &ID0[..63]),
        format!("/system.slice/docker-{ID0}0.scope"),
        format!("/system.slice/docker-{}g.scope", &ID0[..63]),
        format!("/docker/{}", &ID0[..63]),
        format!("/docker/{ID0}0"),
        format!("/docker/{ID0}.mount"),
    ] {
        assert_eq!(parse(&path), CgroupContext::default(), "{path}");
    }
    // An unknown prefix is still a container, of an unknown runtime (as procs has it).
    let other = format!("/system.slice/runtime-{ID0}.scope");
    assert_eq!(parse(&other), ctx(Some(ID0), None, None));
}

#[test]
fn a_deleted_cgroup_keeps_its_context() {
    // cgroup v2 appends " (deleted)" to a zombie's path once its cgroup is removed.
    let path = format!(
        "/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{ID2}.scope (deleted)",
        UID2.replace('-', "_")
    );
    assert_eq!(parse(&path), ctx(Some(ID2), Some(UID2), Some(Containerd)));
}

#[test]
fn an_outer_container_holds_what_no_inner_one_does() {
    // The node container's own processes (a kind or minikube node's kubelet, containerd).
    assert_eq!(
        parse(&format!("/docker/{ID13}/kubepods/besteffort")),
        ctx(Some(ID13), None, Some(Docker))
    );
    assert_eq!(
        parse(&format!("/docker/{ID13}/system.slice/containerd.service")),
        ctx(Some(ID13), None, Some(Docker))
    );
}

#[test]
fn cgroupfs_pods_need_kubepods_or_a_hidden_ancestry() {
    // `pod<uid>` elsewhere is not a kubelet pod...
    assert_eq!(
        parse(&format!("/pod{UID0}/{ID0}")),
        ctx(Some(ID0), None, None)
    );
    // ...unless the path starts above the reader's namespace, where kubepods may be hidden;
    // then only a well-formed UID counts.
    assert_eq!(
        parse(&format!("/../../pod{UID0}/{ID0}")),
        ctx(Some(ID0), Some(UID0), None)
    );
    assert_eq!(
        parse(&format!("/../../podman/{ID0}")),
        ctx(Some(ID0), None, None)
    );
}

#[test]
fn the_first_path_naming_a_container_wins_whole() {
    let pod_only = format!(
        "/kubepods.slice/kubepods-pod{}.slice/crio-conmon-{ID4}.scope",
        UID3.replace('-', "_")
    );
    let docker = format!("/docker/{ID11}");
    // The unified path first.
    assert_eq!(
        context(Some(&docker), [pod_only.as_str()]),
        ctx(Some(ID11), None, Some(Docker))
    );
    // A container in a later v1 path beats a pod alone in an earlier one; the two are not mixed.
    assert_eq!(
        context(Some(&pod_only), ["/", docker.as_str()]),
        ctx(Some(ID11), None, Some(Docker))
    );
    // Without a container, the first pod.
    assert_eq!(
        context(Some("/"), ["/", pod_only.as_str()]),
        ctx(None, Some(UID3), None)
    );
    assert_eq!(context(None, []), CgroupContext::default());
    assert!(context(None, ["/"]).is_empty());
    assert!(!context(Some(&pod_only), []).is_empty());
}

#[test]
fn garbage_gives_nothing() {
    let ours = [
        "",
        "\n",
        "garbage",
        "0:",
        "0::",
        ":::",
        "0::////",
        "0::/..",
        "0::/kubepods/pod",
        "0::/kubepods.slice/kubepods-pod.slice",
        "0::/-.slice/-/.scope/pod-/-pod.slice",
        "0::/a.slice:b:c:d/x.slice::",
        "0::/é/ü.scope/\u{0}",
        "12:memory",
    ];
    for text in ours {
        assert_eq!(from_proc_cgroup(text), CgroupContext::default(), "{text:?}");
    }
}

#[test]
fn truncated_files_never_panic_nor_give_a_partial_id() {
    // Every prefix of every fixture, as a read cut short would leave it.
    let mut checked = 0;
    for ((name, text), _) in cases() {
        for end in (0..=text.len()).filter(|&i| text.is_char_boundary(i)) {
            let got = from_proc_cgroup(&text[..end]);
            if let Some(id) = &got.container_id {
                assert!(is_container_id(id), "{name}[..{end}]: {id}");
            }
            if let Some(uid) = &got.pod_uid {
                assert!(is_pod_uid(uid), "{name}[..{end}]: {uid}");
            }
            checked += 1;
        }
    }
    assert!(checked > 10_000, "{checked}");
}

#[test]
fn runtime_names() {
    assert_eq!(Docker.as_str(), "docker");
    assert_eq!(Containerd.as_str(), "containerd");
    assert_eq!(CriO.as_str(), "cri-o");
    assert_eq!(Podman.as_str(), "podman");
}
