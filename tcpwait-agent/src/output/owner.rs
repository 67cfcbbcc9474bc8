//! Who holds a socket, as the records show it: [`OwnerView`] (what the daemon knows) and
//! [`OwnerFields`], the `owner_*` keys that transition and reset records of `tail` share.
use serde::{Deserialize, Serialize};

use super::escape_control;

/// Who holds the socket, when known (filled by the daemon; `trace` leaves it empty).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OwnerView {
    pub pid: u32,
    pub comm: String,
    /// Container id, from the holder's cgroup.
    pub container: Option<String>,
    /// Kubernetes pod UID, from the holder's cgroup.
    pub pod_uid: Option<String>,
}

/// The holder's fields of a `tail` record, transition or reset (flattened into it; absent
/// from `trace`, and each absent when unknown).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OwnerFields {
    /// Holder's process id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_pid: Option<u32>,
    /// Holder's task name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_comm: Option<String>,
    /// Holder's container id, when its cgroup names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_container: Option<String>,
    /// Holder's Kubernetes pod UID, when its cgroup names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_pod_uid: Option<String>,
}

impl OwnerFields {
    /// The fields of `owner`, all absent for `None`.
    pub fn new(owner: Option<&OwnerView>) -> Self {
        Self {
            owner_pid: owner.map(|o| o.pid),
            owner_comm: owner.map(|o| o.comm.clone()),
            owner_container: owner.and_then(|o| o.container.clone()),
            owner_pod_uid: owner.and_then(|o| o.pod_uid.clone()),
        }
    }

    /// The end of a text line: `  owner=<pid>/<comm>` (escaped), or nothing when unknown.
    pub fn text(&self) -> String {
        match (&self.owner_pid, &self.owner_comm) {
            (Some(pid), Some(comm)) => format!("  owner={pid}/{}", escape_control(comm)),
            _ => String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        event::reset::{decode, tests::wire},
        output::{TransitionRecord, WallTime, write_json_line},
        resets::ResetRecord,
    };
    use tcpwait_common::reset::{KIND_ABORT, flag};

    fn holder() -> OwnerView {
        OwnerView {
            pid: 77,
            comm: "leaky".into(),
            container: Some("abc".into()),
            pod_uid: None,
        }
    }

    fn line(value: &impl serde::Serialize) -> String {
        let mut buf = Vec::new();
        write_json_line(&mut buf, value).expect("write");
        String::from_utf8(buf).expect("utf-8")
    }

    /// The owner fields, flattened, keep the keys and their order of the records that carried
    /// them inline: lines as the agent wrote them before, byte for byte; absent when unknown.
    #[test]
    fn records_carry_the_owner_fields_as_before() {
        let t = crate::output::tests::sample();
        let r = decode(&wire(KIND_ABORT, 2, 14, flag::IN_TASK | flag::LINGER_ZERO)).expect("ok");
        let names = vec![("SK_RST_REASON_TCP_STATE".to_owned(), 14)];
        let time = WallTime(1_765_000_000_123_456_789);
        let tr = |owner: Option<&OwnerView>| {
            line(&TransitionRecord::new(&t, Some(1_500_000), owner, time))
        };
        let rr = |owner: Option<&OwnerView>| line(&ResetRecord::new(&r, &names, owner, time));
        assert_eq!(
            tr(Some(&holder())),
            concat!(
                r#"{"ts_ns":5000000000,"time":"2025-12-06T05:46:40.123456Z","skaddr":"0xffff000000001000","netns":4026532301,"pid":10,"tid":11,"comm":"evil\u001b[","family":6,"saddr":"::1","sport":8080,"daddr":"::1","dport":40000,"old":"ESTABLISHED","new":"CLOSE_WAIT","ms_in_old":1.5,"owner_pid":77,"owner_comm":"leaky","owner_container":"abc"}"#,
                "\n"
            )
        );
        assert_eq!(
            rr(Some(&holder())),
            concat!(
                r#"{"kind":"abort","ts_ns":7000,"time":"2025-12-06T05:46:40.123456Z","skaddr":"0xffff888000000040","netns":4026532301,"pid":4242,"comm":"login-srv","family":4,"saddr":"10.0.0.1","sport":7000,"daddr":"10.0.0.2","dport":40000,"reason":"linger_0","kernel_reason":"SK_RST_REASON_TCP_STATE","unsent_bytes":123456,"unread_bytes":10000,"discarded_bytes":133456,"owner_pid":77,"owner_comm":"leaky","owner_container":"abc"}"#,
                "\n"
            )
        );
        assert_eq!(
            tr(None),
            concat!(
                r#"{"ts_ns":5000000000,"time":"2025-12-06T05:46:40.123456Z","skaddr":"0xffff000000001000","netns":4026532301,"pid":10,"tid":11,"comm":"evil\u001b[","family":6,"saddr":"::1","sport":8080,"daddr":"::1","dport":40000,"old":"ESTABLISHED","new":"CLOSE_WAIT","ms_in_old":1.5}"#,
                "\n"
            )
        );
        assert_eq!(
            rr(None),
            concat!(
                r#"{"kind":"abort","ts_ns":7000,"time":"2025-12-06T05:46:40.123456Z","skaddr":"0xffff888000000040","netns":4026532301,"pid":4242,"comm":"login-srv","family":4,"saddr":"10.0.0.1","sport":7000,"daddr":"10.0.0.2","dport":40000,"reason":"linger_0","kernel_reason":"SK_RST_REASON_TCP_STATE","unsent_bytes":123456,"unread_bytes":10000,"discarded_bytes":133456}"#,
                "\n"
            )
        );
        // And they read back.
        let back: TransitionRecord<'_> = serde_json::from_str(&tr(Some(&holder()))).expect("JSON");
        assert_eq!(back.owner, OwnerFields::new(Some(&holder())));
        let back: ResetRecord<'_> = serde_json::from_str(&rr(None)).expect("JSON");
        assert_eq!(back.owner, OwnerFields::default());
        assert_eq!(OwnerFields::new(Some(&holder())).text(), "  owner=77/leaky");
    }
}
