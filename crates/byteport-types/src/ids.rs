//! Typed identifiers: a `VmId` can never be passed where a `NodeId` is meant.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

macro_rules! typed_id {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {$(
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema)]
        #[serde(transparent)]
        #[schema(value_type = String, format = Uuid)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A new, time-ordered id (UUIDv7), so ids sort by creation.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }

        impl From<Uuid> for $name {
            fn from(u: Uuid) -> Self {
                Self(u)
            }
        }
    )*};
}

typed_id!(
    /// A virtual machine.
    VmId,
    /// A node (a host running the node agent).
    NodeId,
    /// A project: the unit of ownership, membership and quota.
    ProjectId,
    /// A user account.
    UserId,
    /// An image in the catalog.
    ImageId,
    /// A flavor (instance type).
    FlavorId,
    /// A personal API token.
    TokenId,
    /// An audit event.
    EventId,
    /// An environment (a group of VMs made and removed together).
    EnvironmentId,
    /// A run of code in a VM of its own.
    RunId,
    /// An invite: a single-use sign-up link.
    InviteId,
);
