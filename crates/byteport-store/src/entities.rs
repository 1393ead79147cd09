//! SeaORM entities: one module per table. Sizes are signed because
//! PostgreSQL has no unsigned integers; the store converts at its boundary.

macro_rules! no_relations {
    () => {
        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}
        impl ActiveModelBehavior for ActiveModel {}
    };
}

pub mod setting {
    use sea_orm::entity::prelude::*;
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "settings")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub key: String,
        pub value: String,
    }
    no_relations!();
}

pub mod user {
    use sea_orm::entity::prelude::*;
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "users")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        #[sea_orm(unique)]
        pub name: String,
        pub password_hash: String,
        pub admin: bool,
        pub created_at: DateTimeUtc,
    }
    no_relations!();
}

pub mod session {
    use sea_orm::entity::prelude::*;
    /// A refresh token or a browser session, stored as a SHA-256 hash.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "sessions")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub user_id: Uuid,
        #[sea_orm(unique)]
        pub token_hash: String,
        /// `refresh` or `cookie`.
        pub kind: String,
        pub expires_at: DateTimeUtc,
        pub revoked: bool,
        pub created_at: DateTimeUtc,
    }
    no_relations!();
}

pub mod api_token {
    use sea_orm::entity::prelude::*;
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "api_tokens")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub user_id: Uuid,
        pub name: String,
        pub prefix: String,
        #[sea_orm(unique)]
        pub token_hash: String,
        pub created_at: DateTimeUtc,
        pub expires_at: Option<DateTimeUtc>,
        pub last_used_at: Option<DateTimeUtc>,
        pub revoked: bool,
    }
    no_relations!();
}

pub mod invite {
    use sea_orm::entity::prelude::*;
    /// A single-use sign-up link, stored as the SHA-256 of its secret.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "invites")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        #[sea_orm(unique)]
        pub token_hash: String,
        /// The name of who made it (kept when that user is deleted).
        pub created_by: String,
        /// The project the new user joins, with `role`.
        pub project_id: Option<Uuid>,
        pub role: Option<String>,
        pub created_at: DateTimeUtc,
        pub expires_at: DateTimeUtc,
        pub used_at: Option<DateTimeUtc>,
        pub used_by: Option<Uuid>,
    }
    no_relations!();
}

pub mod project {
    use sea_orm::entity::prelude::*;
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "projects")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        #[sea_orm(unique)]
        pub name: String,
        pub description: String,
        pub max_vms: i64,
        pub max_vcpus: i64,
        pub max_memory_mib: i64,
        pub max_disk_gib: i64,
        pub created_at: DateTimeUtc,
        /// Which /24 of the bridged address plan is the project's (see
        /// `byteport_types::net`); unique, given at insert.
        pub network_index: Option<i64>,
        /// How many runs may run at once.
        pub max_concurrent_runs: i64,
    }
    no_relations!();
}

pub mod member {
    use sea_orm::entity::prelude::*;
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "project_members")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub project_id: Uuid,
        #[sea_orm(primary_key, auto_increment = false)]
        pub user_id: Uuid,
        /// `viewer`, `member` or `owner`.
        pub role: String,
    }
    no_relations!();
}

pub mod flavor {
    use sea_orm::entity::prelude::*;
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "flavors")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        #[sea_orm(unique)]
        pub name: String,
        pub vcpus: i64,
        pub memory_mib: i64,
        pub disk_gib: i64,
        pub created_at: DateTimeUtc,
    }
    no_relations!();
}

pub mod image {
    use sea_orm::entity::prelude::*;
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "images")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        #[sea_orm(unique)]
        pub name: String,
        pub os_family: String,
        pub os_version: String,
        pub arch: String,
        pub format: String,
        pub size_bytes: i64,
        pub sha256: String,
        pub boot: String,
        pub kernel_sha256: Option<String>,
        pub initrd_sha256: Option<String>,
        pub cmdline: Option<String>,
        pub has_agent: bool,
        pub status: String,
        pub created_at: DateTimeUtc,
        /// The user an SSH key logs in as (cloud-init's default user).
        pub login_user: Option<String>,
    }
    no_relations!();
}

pub mod vm {
    use sea_orm::entity::prelude::*;
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "vms")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub project_id: Uuid,
        pub name: String,
        pub image_id: Uuid,
        pub image_name: String,
        pub flavor_name: Option<String>,
        pub vcpus: i64,
        pub memory_mib: i64,
        pub disk_gib: i64,
        pub hostname: String,
        /// JSON object.
        pub labels: String,
        /// JSON array.
        pub ssh_keys: String,
        pub user_data: Option<String>,
        pub state: String,
        pub state_reason: Option<String>,
        pub desired_state: String,
        pub desired_generation: i64,
        pub observed_state: Option<String>,
        pub observed_generation: i64,
        pub node_id: Option<Uuid>,
        /// JSON array of port forwards.
        pub ports: String,
        pub created_at: DateTimeUtc,
        pub updated_at: DateTimeUtc,
        pub deleted_at: Option<DateTimeUtc>,
        pub has_agent: bool,
        pub agent_version: Option<String>,
        /// Whether the VM holds a reservation on `node_id`.
        pub reserved: bool,
        /// JSON placement wishes (policy, region, anti-affinity group).
        pub placement: Option<String>,
        /// The anti-affinity group, also inside `placement`, for lookups.
        pub placement_group: Option<String>,
        /// Whether the VM's vCPUs and memory are reserved on its node (a
        /// stopped VM gives them back and keeps only its disk).
        pub compute_held: bool,
        /// SHA-256 of the VM's metadata token (the token itself is derived
        /// from a cluster secret and never stored).
        pub metadata_token_hash: Option<String>,
        /// What the guest reported of cloud-init: `running`, `done`,
        /// `error` or `absent`.
        pub cloud_init: Option<String>,
        /// Who to SSH in as: the image's login user when it was created.
        pub ssh_user: Option<String>,
        /// The environment the VM was made for, if any.
        pub environment_id: Option<Uuid>,
        /// JSON array of guest ports to map (besides 22).
        pub guest_ports: String,
        /// `allow` or `deny`: outbound connections.
        pub egress: String,
        /// JSON of how its node connected it (`VmNetwork`).
        pub network: Option<String>,
        /// The guest's architecture (its image's).
        pub arch: String,
        /// `native` or `emulated`, as its node reported running it.
        pub execution: Option<String>,
        /// `qemu` or `microvm`.
        pub engine: String,
    }
    no_relations!();
}

pub mod environment {
    use sea_orm::entity::prelude::*;
    /// A group of VMs made together, one per matching image, removed
    /// together (at `expires_at` at the latest).
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "environments")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub project_id: Uuid,
        pub name: String,
        /// JSON array of the image-name prefixes asked for.
        pub os_prefixes: String,
        pub flavor_name: Option<String>,
        pub expires_at: Option<DateTimeUtc>,
        pub created_at: DateTimeUtc,
        pub deleted_at: Option<DateTimeUtc>,
    }
    no_relations!();
}

pub mod run {
    use sea_orm::entity::prelude::*;
    /// One run of code in a VM of its own; kept after the VM is gone.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "runs")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub project_id: Uuid,
        pub user_name: String,
        pub language: String,
        pub code_sha256: String,
        /// `running`, then how it ended (`RunState`).
        pub state: String,
        pub exit_code: Option<i32>,
        pub signal: Option<i32>,
        pub message: Option<String>,
        pub vcpus: i64,
        pub memory_mib: i64,
        pub timeout_secs: i64,
        pub node_id: Option<Uuid>,
        /// JSON `RunTimings`.
        pub timings: String,
        pub stdout: String,
        pub stderr: String,
        pub output_truncated: bool,
        pub created_at: DateTimeUtc,
        pub ended_at: Option<DateTimeUtc>,
    }
    no_relations!();
}

pub mod vm_label {
    use sea_orm::entity::prelude::*;
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "vm_labels")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub vm_id: Uuid,
        #[sea_orm(primary_key, auto_increment = false)]
        pub key: String,
        pub value: String,
    }
    no_relations!();
}

pub mod node {
    use sea_orm::entity::prelude::*;
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "nodes")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        #[sea_orm(unique)]
        pub name: String,
        pub region: String,
        pub arch: String,
        /// JSON array.
        pub engines: String,
        pub kvm: bool,
        pub status: String,
        pub credential_hash: String,
        pub cap_vcpus: i64,
        pub cap_memory_mib: i64,
        pub cap_disk_gib: i64,
        pub used_vcpus: i64,
        pub used_memory_mib: i64,
        pub used_disk_gib: i64,
        pub reserved_vcpus: i64,
        pub reserved_memory_mib: i64,
        pub reserved_disk_gib: i64,
        pub last_heartbeat_at: Option<DateTimeUtc>,
        pub created_at: DateTimeUtc,
        /// JSON of the latest per-VM figures the node sent (`VmStats`
        /// list), from its last heartbeat.
        pub vm_stats: Option<String>,
        /// JSON array of the architectures it runs guests of (`Platform`);
        /// empty: its own `arch` only.
        pub platforms: String,
        /// JSON array of the engines it lacks, with why
        /// (`EngineUnavailable`).
        pub unavailable_engines: String,
    }
    no_relations!();
}

pub mod join_token {
    use sea_orm::entity::prelude::*;
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "join_tokens")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub token_hash: String,
        pub expires_at: DateTimeUtc,
        pub used: bool,
        pub created_at: DateTimeUtc,
    }
    no_relations!();
}

pub mod idempotency {
    use sea_orm::entity::prelude::*;
    /// A stored response to a POST with an `Idempotency-Key`. `status` is 0
    /// while the first request is still being served.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "idempotency_keys")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub actor: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub key: String,
        pub request_hash: String,
        pub status: i32,
        pub content_type: String,
        pub body: Vec<u8>,
        pub created_at: DateTimeUtc,
    }
    no_relations!();
}

pub mod audit {
    use sea_orm::entity::prelude::*;
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "audit_events")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub at: DateTimeUtc,
        pub actor: String,
        pub actor_id: Option<Uuid>,
        pub action: String,
        pub target_kind: Option<String>,
        pub target_id: Option<String>,
        pub project_id: Option<Uuid>,
        pub status: i32,
        pub result: String,
    }
    no_relations!();
}
