//! The VM state machine, as a pure function shared by the control plane and
//! the node agent.
//!
//! A VM has a *desired* state (what the user asked for, set by actions) and an
//! *observed* state (what its node last reported). The public [`VmState`] is
//! derived from both:
//!
//! ```text
//!            create                      start (placed)
//!   ──────► pending ──placed──► provisioning ◄─────────── stopped ◄─┐
//!              │                     │ node: running        ▲       │
//!              │ stop (unplaced)     ▼                      │       │ node: stopped
//!              └──────────────► running ──stop──► stopping ─┘       │
//!                              │  ▲   │ ▲                            │
//!                        pause │  │   │ └── node: running ── rebooting ◄─ restart
//!                              ▼  │resume
//!                             paused
//!
//!   any state but deleting/deleted ──delete──► deleting ──node: deleted──► deleted
//!   (an unplaced VM goes straight to deleted; nothing runs anywhere)
//!   node failure ──► error (with a reason);  node offline ──► unknown
//! ```
//!
//! [`plan`] decides whether an action is allowed and what it changes;
//! [`derive`] turns a node's observation into the public state.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The public state of a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Not yet placed on a node.
    Pending,
    /// Placed; its node is preparing or starting it.
    Provisioning,
    Running,
    Paused,
    /// A stop was requested; the guest is shutting down.
    Stopping,
    Stopped,
    /// A restart was requested and not yet carried out.
    Rebooting,
    /// A delete was requested; its node is removing it.
    Deleting,
    Deleted,
    /// Its node reported a failure; `state_reason` says which.
    Error,
    /// Its node is offline; the last known state may be stale.
    Unknown,
}

/// What the user wants the VM to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DesiredState {
    Running,
    Paused,
    Stopped,
    Deleted,
}

/// What a node saw of a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ObservedState {
    /// Preparing the disk or starting the hypervisor process.
    Provisioning,
    Running,
    Paused,
    Stopped,
    /// Every trace of the VM is gone from the node.
    Deleted,
    /// The hypervisor failed; the report carries the reason.
    Error,
}

/// A lifecycle action.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmAction {
    Start,
    Stop,
    Restart,
    Pause,
    Resume,
    Delete,
}

macro_rules! snake_display {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let v = serde_json::to_value(self).map_err(|_| fmt::Error)?;
                f.write_str(v.as_str().unwrap_or_default())
            }
        }
    )*};
}
snake_display!(VmState, DesiredState, ObservedState, VmAction);

macro_rules! snake_parse {
    ($($t:ty),*) => {$(
        impl std::str::FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                serde_json::from_value(serde_json::Value::String(s.to_owned()))
                    .map_err(|_| format!("unknown {} {s:?}", stringify!($t)))
            }
        }
    )*};
}
snake_parse!(VmState, DesiredState, ObservedState, VmAction);

impl VmState {
    /// Every state, for tables and tests.
    pub const ALL: [VmState; 11] = [
        VmState::Pending,
        VmState::Provisioning,
        VmState::Running,
        VmState::Paused,
        VmState::Stopping,
        VmState::Stopped,
        VmState::Rebooting,
        VmState::Deleting,
        VmState::Deleted,
        VmState::Error,
        VmState::Unknown,
    ];

    /// A state that no action or report will leave by itself.
    pub fn is_settled(self) -> bool {
        matches!(
            self,
            VmState::Running
                | VmState::Paused
                | VmState::Stopped
                | VmState::Deleted
                | VmState::Error
        )
    }
}

impl VmAction {
    pub const ALL: [VmAction; 6] = [
        VmAction::Start,
        VmAction::Stop,
        VmAction::Restart,
        VmAction::Pause,
        VmAction::Resume,
        VmAction::Delete,
    ];
}

/// An action the state machine refuses, with a message naming both.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("cannot {action} a VM that is {state}: {why}")]
pub struct InvalidTransition {
    pub state: VmState,
    pub action: VmAction,
    pub why: &'static str,
}

/// The changes an allowed action makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    pub desired: DesiredState,
    pub state: VmState,
}

/// Decides whether `action` is allowed for a VM in `state` whose desired state
/// is `desired`, and what it becomes. `placed` tells whether a node holds the
/// VM: an unplaced VM has nothing running, so stop and delete finish at once.
pub fn plan(
    state: VmState,
    desired: DesiredState,
    placed: bool,
    action: VmAction,
) -> Result<Plan, InvalidTransition> {
    use VmAction as A;
    use VmState as S;
    let deny = |why| Err(InvalidTransition { state, action, why });
    match state {
        S::Deleted => return deny("it has been deleted"),
        S::Deleting => return deny("it is being deleted"),
        _ => {}
    }
    match action {
        A::Delete => Ok(Plan {
            desired: DesiredState::Deleted,
            state: if placed { S::Deleting } else { S::Deleted },
        }),
        A::Start => match state {
            S::Stopped | S::Error if desired != DesiredState::Running || state == S::Error => {
                Ok(Plan {
                    desired: DesiredState::Running,
                    state: if placed { S::Provisioning } else { S::Pending },
                })
            }
            S::Running | S::Rebooting => deny("it is already running"),
            S::Paused => deny("it is paused; resume it instead"),
            S::Pending | S::Provisioning => deny("it is already starting"),
            // A stop on its way: the node will find it meant to run (and
            // start it again if it had stopped).
            S::Stopping => Ok(Plan {
                desired: DesiredState::Running,
                state: S::Provisioning,
            }),
            S::Unknown => deny("its node is offline"),
            _ => deny("a start is already in progress"),
        },
        A::Stop => match state {
            _ if desired == DesiredState::Stopped => match state {
                S::Stopped => deny("it is already stopped"),
                _ => deny("a stop is already in progress"),
            },
            S::Pending => Ok(Plan {
                desired: DesiredState::Stopped,
                state: if placed { S::Stopping } else { S::Stopped },
            }),
            S::Provisioning | S::Running | S::Paused | S::Rebooting | S::Error => Ok(Plan {
                desired: DesiredState::Stopped,
                state: S::Stopping,
            }),
            S::Unknown => Ok(Plan {
                desired: DesiredState::Stopped,
                state: S::Unknown,
            }),
            _ => deny("it is not running"),
        },
        A::Restart => match state {
            S::Running if desired == DesiredState::Running => Ok(Plan {
                desired: DesiredState::Running,
                state: S::Rebooting,
            }),
            S::Running => deny("another action is in progress"),
            S::Rebooting => deny("a restart is already in progress"),
            S::Paused => deny("it is paused; resume it first"),
            _ => deny("only a running VM can be restarted"),
        },
        A::Pause => match state {
            S::Running if desired == DesiredState::Running => Ok(Plan {
                desired: DesiredState::Paused,
                state: S::Running,
            }),
            S::Running if desired == DesiredState::Paused => deny("a pause is already in progress"),
            S::Running => deny("another action is in progress"),
            // A resume on its way: it stays paused.
            S::Paused if desired == DesiredState::Running => Ok(Plan {
                desired: DesiredState::Paused,
                state: S::Paused,
            }),
            S::Paused => deny("it is already paused"),
            _ => deny("only a running VM can be paused"),
        },
        A::Resume => match state {
            S::Paused if desired == DesiredState::Paused => Ok(Plan {
                desired: DesiredState::Running,
                state: S::Paused,
            }),
            S::Paused => deny("a resume is already in progress"),
            // A pause on its way (judged by where the VM is going): it
            // keeps running.
            S::Running if desired == DesiredState::Paused => Ok(Plan {
                desired: DesiredState::Running,
                state: S::Running,
            }),
            S::Running => deny("it is not paused"),
            _ => deny("only a paused VM can be resumed"),
        },
    }
}

/// The public state from the desired state and a node's latest observation.
///
/// `caught_up` says whether the node had seen the VM's latest desired
/// generation when it observed; if not, the transitional state that the last
/// action set is kept, so a stale report never undoes an action in flight.
pub fn derive(
    current: VmState,
    desired: DesiredState,
    observed: ObservedState,
    caught_up: bool,
) -> VmState {
    use DesiredState as D;
    use ObservedState as O;
    use VmState as S;
    match (desired, observed) {
        (_, O::Deleted) => S::Deleted,
        (_, O::Error) => S::Error,
        _ if !caught_up => current,
        (D::Deleted, _) => S::Deleting,
        (_, O::Provisioning) => S::Provisioning,
        (D::Stopped, O::Stopped) => S::Stopped,
        (D::Stopped, _) => S::Stopping,
        (D::Running, O::Stopped) => S::Provisioning,
        (_, O::Running) => S::Running,
        (_, O::Paused) => S::Paused,
        (D::Paused, O::Stopped) => S::Stopped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use VmAction as A;
    use VmState as S;

    /// The desired state that normally accompanies a settled public state.
    fn usual_desired(s: VmState) -> DesiredState {
        match s {
            S::Stopped | S::Stopping => DesiredState::Stopped,
            S::Paused => DesiredState::Paused,
            S::Deleting | S::Deleted => DesiredState::Deleted,
            _ => DesiredState::Running,
        }
    }

    /// An action is judged against where the VM is going: a pause not yet
    /// carried out can be resumed at once, a resume paused again, a stop
    /// started again.
    #[test]
    fn actions_follow_the_desired_state() {
        let p = plan(S::Running, DesiredState::Paused, true, VmAction::Resume).unwrap();
        assert_eq!((p.desired, p.state), (DesiredState::Running, S::Running));
        let p = plan(S::Paused, DesiredState::Running, true, VmAction::Pause).unwrap();
        assert_eq!((p.desired, p.state), (DesiredState::Paused, S::Paused));
        let p = plan(S::Stopping, DesiredState::Stopped, true, VmAction::Start).unwrap();
        assert_eq!(p.desired, DesiredState::Running);
        assert!(plan(S::Running, DesiredState::Running, true, VmAction::Resume).is_err());
    }

    /// Every (state, action) pair, for a placed VM: `Some(new state)` when
    /// allowed, `None` when the action must be refused with a 409.
    #[test]
    fn every_state_action_pair() {
        let table: &[(VmState, [Option<VmState>; 6])] = &[
            //                start              stop               restart             pause              resume             delete
            (
                S::Pending,
                [None, Some(S::Stopping), None, None, None, Some(S::Deleting)],
            ),
            (
                S::Provisioning,
                [None, Some(S::Stopping), None, None, None, Some(S::Deleting)],
            ),
            (
                S::Running,
                [
                    None,
                    Some(S::Stopping),
                    Some(S::Rebooting),
                    Some(S::Running),
                    None,
                    Some(S::Deleting),
                ],
            ),
            (
                S::Paused,
                [
                    None,
                    Some(S::Stopping),
                    None,
                    None,
                    Some(S::Paused),
                    Some(S::Deleting),
                ],
            ),
            (
                S::Stopping,
                [
                    Some(S::Provisioning),
                    None,
                    None,
                    None,
                    None,
                    Some(S::Deleting),
                ],
            ),
            (
                S::Stopped,
                [
                    Some(S::Provisioning),
                    None,
                    None,
                    None,
                    None,
                    Some(S::Deleting),
                ],
            ),
            (
                S::Rebooting,
                [None, Some(S::Stopping), None, None, None, Some(S::Deleting)],
            ),
            (S::Deleting, [None, None, None, None, None, None]),
            (S::Deleted, [None, None, None, None, None, None]),
            (
                S::Error,
                [
                    Some(S::Provisioning),
                    Some(S::Stopping),
                    None,
                    None,
                    None,
                    Some(S::Deleting),
                ],
            ),
            (
                S::Unknown,
                [None, Some(S::Unknown), None, None, None, Some(S::Deleting)],
            ),
        ];
        assert_eq!(table.len(), S::ALL.len(), "every state has a row");
        for (state, row) in table {
            for (action, expect) in A::ALL.iter().zip(row) {
                let got = plan(*state, usual_desired(*state), true, *action);
                match (expect, &got) {
                    (Some(next), Ok(p)) => assert_eq!(p.state, *next, "{state} + {action}"),
                    (None, Err(e)) => {
                        assert_eq!((e.state, e.action), (*state, *action));
                        let msg = e.to_string();
                        assert!(
                            msg.contains(&state.to_string()) && msg.contains(&action.to_string()),
                            "{msg}"
                        );
                    }
                    _ => panic!("{state} + {action}: expected {expect:?}, got {got:?}"),
                }
            }
        }
    }

    #[test]
    fn unplaced_vm_stops_and_deletes_at_once() {
        let p = plan(S::Pending, DesiredState::Running, false, A::Stop).unwrap();
        assert_eq!((p.state, p.desired), (S::Stopped, DesiredState::Stopped));
        let p = plan(S::Stopped, DesiredState::Stopped, false, A::Start).unwrap();
        assert_eq!((p.state, p.desired), (S::Pending, DesiredState::Running));
        let p = plan(S::Pending, DesiredState::Running, false, A::Delete).unwrap();
        assert_eq!(p.state, S::Deleted);
    }

    #[test]
    fn a_repeated_request_is_refused_not_ignored() {
        let p = plan(S::Running, DesiredState::Running, true, A::Pause).unwrap();
        let again = plan(p.state, p.desired, true, A::Pause).unwrap_err();
        assert!(again.to_string().contains("already in progress"));
    }

    #[test]
    fn stale_reports_keep_the_transitional_state() {
        assert_eq!(
            derive(
                S::Stopping,
                DesiredState::Stopped,
                ObservedState::Running,
                false
            ),
            S::Stopping
        );
        assert_eq!(
            derive(
                S::Stopping,
                DesiredState::Stopped,
                ObservedState::Stopped,
                true
            ),
            S::Stopped
        );
        assert_eq!(
            derive(
                S::Rebooting,
                DesiredState::Running,
                ObservedState::Running,
                true
            ),
            S::Running
        );
        assert_eq!(
            derive(
                S::Running,
                DesiredState::Running,
                ObservedState::Error,
                false
            ),
            S::Error
        );
    }
}
