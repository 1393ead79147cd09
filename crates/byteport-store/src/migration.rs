//! Schema migrations, run at every start. Each migration is frozen once
//! released: a change to the schema is a new migration, never an edit.

use crate::entities::*;
use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

pub struct Migrator;

#[sea_orm_migration::async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(M0001Initial),
            Box::new(M0002Agents),
            Box::new(M0003Placement),
            Box::new(M0004ComputeHeld),
            Box::new(M0005Metadata),
            Box::new(M0006Environments),
            Box::new(M0007VmStats),
            Box::new(M0008Networks),
            Box::new(M0009Runs),
            Box::new(M0010Invites),
            Box::new(M0011Platforms),
            Box::new(M0012UnavailableEngines),
            Box::new(M0013ListIndexes),
            Box::new(M0014NodeVersions),
        ]
    }
}

struct M0001Initial;

impl MigrationName for M0001Initial {
    fn name(&self) -> &str {
        "m0001_initial"
    }
}

fn ts<T: IntoIden>(c: T) -> ColumnDef {
    timestamp_with_time_zone(c)
}

fn ts_null<T: IntoIden>(c: T) -> ColumnDef {
    timestamp_with_time_zone_null(c)
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for M0001Initial {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        use sea_orm::EntityName;
        let create = |t: &mut TableCreateStatement| t.if_not_exists().to_owned();

        m.create_table(create(
            Table::create()
                .table(setting::Entity.table_ref())
                .col(string(setting::Column::Key).primary_key())
                .col(text(setting::Column::Value)),
        ))
        .await?;

        m.create_table(create(
            Table::create()
                .table(user::Entity.table_ref())
                .col(uuid(user::Column::Id).primary_key())
                .col(string_uniq(user::Column::Name))
                .col(string(user::Column::PasswordHash))
                .col(boolean(user::Column::Admin))
                .col(ts(user::Column::CreatedAt)),
        ))
        .await?;

        m.create_table(create(
            Table::create()
                .table(session::Entity.table_ref())
                .col(uuid(session::Column::Id).primary_key())
                .col(uuid(session::Column::UserId))
                .col(string_uniq(session::Column::TokenHash))
                .col(string(session::Column::Kind))
                .col(ts(session::Column::ExpiresAt))
                .col(boolean(session::Column::Revoked))
                .col(ts(session::Column::CreatedAt)),
        ))
        .await?;

        m.create_table(create(
            Table::create()
                .table(api_token::Entity.table_ref())
                .col(uuid(api_token::Column::Id).primary_key())
                .col(uuid(api_token::Column::UserId))
                .col(string(api_token::Column::Name))
                .col(string(api_token::Column::Prefix))
                .col(string_uniq(api_token::Column::TokenHash))
                .col(ts(api_token::Column::CreatedAt))
                .col(ts_null(api_token::Column::ExpiresAt))
                .col(ts_null(api_token::Column::LastUsedAt))
                .col(boolean(api_token::Column::Revoked)),
        ))
        .await?;

        m.create_table(create(
            Table::create()
                .table(project::Entity.table_ref())
                .col(uuid(project::Column::Id).primary_key())
                .col(string_uniq(project::Column::Name))
                .col(text(project::Column::Description))
                .col(big_integer(project::Column::MaxVms))
                .col(big_integer(project::Column::MaxVcpus))
                .col(big_integer(project::Column::MaxMemoryMib))
                .col(big_integer(project::Column::MaxDiskGib))
                .col(ts(project::Column::CreatedAt)),
        ))
        .await?;

        m.create_table(create(
            Table::create()
                .table(member::Entity.table_ref())
                .col(uuid(member::Column::ProjectId))
                .col(uuid(member::Column::UserId))
                .col(string(member::Column::Role))
                .primary_key(
                    Index::create()
                        .col(member::Column::ProjectId)
                        .col(member::Column::UserId),
                ),
        ))
        .await?;

        m.create_table(create(
            Table::create()
                .table(flavor::Entity.table_ref())
                .col(uuid(flavor::Column::Id).primary_key())
                .col(string_uniq(flavor::Column::Name))
                .col(big_integer(flavor::Column::Vcpus))
                .col(big_integer(flavor::Column::MemoryMib))
                .col(big_integer(flavor::Column::DiskGib))
                .col(ts(flavor::Column::CreatedAt)),
        ))
        .await?;

        m.create_table(create(
            Table::create()
                .table(image::Entity.table_ref())
                .col(uuid(image::Column::Id).primary_key())
                .col(string_uniq(image::Column::Name))
                .col(string(image::Column::OsFamily))
                .col(string(image::Column::OsVersion))
                .col(string(image::Column::Arch))
                .col(string(image::Column::Format))
                .col(big_integer(image::Column::SizeBytes))
                .col(string(image::Column::Sha256))
                .col(string(image::Column::Boot))
                .col(string_null(image::Column::KernelSha256))
                .col(string_null(image::Column::InitrdSha256))
                .col(text_null(image::Column::Cmdline))
                .col(boolean(image::Column::HasAgent))
                .col(string(image::Column::Status))
                .col(ts(image::Column::CreatedAt)),
        ))
        .await?;

        m.create_table(create(
            Table::create()
                .table(vm::Entity.table_ref())
                .col(uuid(vm::Column::Id).primary_key())
                .col(uuid(vm::Column::ProjectId))
                .col(string(vm::Column::Name))
                .col(uuid(vm::Column::ImageId))
                .col(string(vm::Column::ImageName))
                .col(string_null(vm::Column::FlavorName))
                .col(big_integer(vm::Column::Vcpus))
                .col(big_integer(vm::Column::MemoryMib))
                .col(big_integer(vm::Column::DiskGib))
                .col(string(vm::Column::Hostname))
                .col(text(vm::Column::Labels))
                .col(text(vm::Column::SshKeys))
                .col(text_null(vm::Column::UserData))
                .col(string(vm::Column::State))
                .col(text_null(vm::Column::StateReason))
                .col(string(vm::Column::DesiredState))
                .col(big_integer(vm::Column::DesiredGeneration))
                .col(string_null(vm::Column::ObservedState))
                .col(big_integer(vm::Column::ObservedGeneration))
                .col(uuid_null(vm::Column::NodeId))
                .col(text(vm::Column::Ports))
                .col(ts(vm::Column::CreatedAt))
                .col(ts(vm::Column::UpdatedAt))
                .col(ts_null(vm::Column::DeletedAt)),
        ))
        .await?;

        m.create_table(create(
            Table::create()
                .table(vm_label::Entity.table_ref())
                .col(uuid(vm_label::Column::VmId))
                .col(string(vm_label::Column::Key))
                .col(string(vm_label::Column::Value))
                .primary_key(
                    Index::create()
                        .col(vm_label::Column::VmId)
                        .col(vm_label::Column::Key),
                ),
        ))
        .await?;

        m.create_table(create(
            Table::create()
                .table(node::Entity.table_ref())
                .col(uuid(node::Column::Id).primary_key())
                .col(string_uniq(node::Column::Name))
                .col(string(node::Column::Region))
                .col(string(node::Column::Arch))
                .col(text(node::Column::Engines))
                .col(boolean(node::Column::Kvm))
                .col(string(node::Column::Status))
                .col(string(node::Column::CredentialHash))
                .col(big_integer(node::Column::CapVcpus))
                .col(big_integer(node::Column::CapMemoryMib))
                .col(big_integer(node::Column::CapDiskGib))
                .col(big_integer(node::Column::UsedVcpus))
                .col(big_integer(node::Column::UsedMemoryMib))
                .col(big_integer(node::Column::UsedDiskGib))
                .col(big_integer(node::Column::ReservedVcpus))
                .col(big_integer(node::Column::ReservedMemoryMib))
                .col(big_integer(node::Column::ReservedDiskGib))
                .col(ts_null(node::Column::LastHeartbeatAt))
                .col(ts(node::Column::CreatedAt)),
        ))
        .await?;

        m.create_table(create(
            Table::create()
                .table(join_token::Entity.table_ref())
                .col(string(join_token::Column::TokenHash).primary_key())
                .col(ts(join_token::Column::ExpiresAt))
                .col(boolean(join_token::Column::Used))
                .col(ts(join_token::Column::CreatedAt)),
        ))
        .await?;

        m.create_table(create(
            Table::create()
                .table(idempotency::Entity.table_ref())
                .col(string(idempotency::Column::Actor))
                .col(string(idempotency::Column::Key))
                .col(string(idempotency::Column::RequestHash))
                .col(integer(idempotency::Column::Status))
                .col(string(idempotency::Column::ContentType))
                .col(blob(idempotency::Column::Body))
                .col(ts(idempotency::Column::CreatedAt))
                .primary_key(
                    Index::create()
                        .col(idempotency::Column::Actor)
                        .col(idempotency::Column::Key),
                ),
        ))
        .await?;

        m.create_table(create(
            Table::create()
                .table(audit::Entity.table_ref())
                .col(uuid(audit::Column::Id).primary_key())
                .col(ts(audit::Column::At))
                .col(string(audit::Column::Actor))
                .col(uuid_null(audit::Column::ActorId))
                .col(string(audit::Column::Action))
                .col(string_null(audit::Column::TargetKind))
                .col(string_null(audit::Column::TargetId))
                .col(uuid_null(audit::Column::ProjectId))
                .col(integer(audit::Column::Status))
                .col(string(audit::Column::Result)),
        ))
        .await?;

        // Plain SQL that both SQLite and PostgreSQL accept: a VM name is
        // unique in its project among VMs that are not deleted.
        let db = m.get_connection();
        for sql in [
            "CREATE UNIQUE INDEX IF NOT EXISTS vms_project_name ON vms (project_id, name) WHERE deleted_at IS NULL",
            "CREATE INDEX IF NOT EXISTS vms_project_id ON vms (project_id, id)",
            "CREATE INDEX IF NOT EXISTS vms_node ON vms (node_id)",
            "CREATE INDEX IF NOT EXISTS vms_state ON vms (state)",
            "CREATE INDEX IF NOT EXISTS vm_labels_kv ON vm_labels (key, value)",
            "CREATE INDEX IF NOT EXISTS members_user ON project_members (user_id)",
            "CREATE INDEX IF NOT EXISTS audit_project ON audit_events (project_id, id)",
            "CREATE INDEX IF NOT EXISTS api_tokens_user ON api_tokens (user_id)",
        ] {
            db.execute_unprepared(sql).await?;
        }
        Ok(())
    }
}

/// Guest agents and reservations: whether a VM's image has the agent, the
/// agent's version once it said ready, and whether the VM holds a
/// reservation on its node (released exactly once, when it is deleted).
struct M0002Agents;

impl MigrationName for M0002Agents {
    fn name(&self) -> &str {
        "m0002_agents"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for M0002Agents {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        use sea_orm::EntityName;
        // SQLite adds one column per ALTER TABLE.
        for col in [
            boolean(vm::Column::HasAgent).default(false).to_owned(),
            string_null(vm::Column::AgentVersion),
            boolean(vm::Column::Reserved).default(false).to_owned(),
        ] {
            let mut col = col;
            m.alter_table(
                Table::alter()
                    .table(vm::Entity.table_ref())
                    .add_column(&mut col)
                    .to_owned(),
            )
            .await?;
        }
        Ok(())
    }
}

/// Placement wishes per VM: policy, region and an anti-affinity group.
struct M0003Placement;

impl MigrationName for M0003Placement {
    fn name(&self) -> &str {
        "m0003_placement"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for M0003Placement {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        use sea_orm::EntityName;
        for col in [
            text_null(vm::Column::Placement),
            string_null(vm::Column::PlacementGroup),
        ] {
            let mut col = col;
            m.alter_table(
                Table::alter()
                    .table(vm::Entity.table_ref())
                    .add_column(&mut col)
                    .to_owned(),
            )
            .await?;
        }
        m.create_index(
            Index::create()
                .name("vms_placement_group")
                .table(vm::Entity.table_ref())
                .col(vm::Column::ProjectId)
                .col(vm::Column::PlacementGroup)
                .if_not_exists()
                .to_owned(),
        )
        .await?;
        Ok(())
    }
}

/// A stopped VM keeps only its disk reserved: whether its vCPUs and memory
/// are held is tracked apart from the disk.
struct M0004ComputeHeld;

impl MigrationName for M0004ComputeHeld {
    fn name(&self) -> &str {
        "m0004_compute_held"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for M0004ComputeHeld {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        use sea_orm::EntityName;
        m.alter_table(
            Table::alter()
                .table(vm::Entity.table_ref())
                .add_column(boolean(vm::Column::ComputeHeld).default(false).to_owned())
                .to_owned(),
        )
        .await?;
        // Every reservation so far held compute too.
        m.get_connection()
            .execute_unprepared("UPDATE vms SET compute_held = reserved")
            .await?;
        Ok(())
    }
}

/// The metadata service: each VM's token (stored hashed), what the guest
/// reported of cloud-init, and who an SSH key logs in as.
struct M0005Metadata;

impl MigrationName for M0005Metadata {
    fn name(&self) -> &str {
        "m0005_metadata"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for M0005Metadata {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        use sea_orm::EntityName;
        // One column per statement: SQLite alters one at a time.
        for col in [
            vm::Column::MetadataTokenHash,
            vm::Column::CloudInit,
            vm::Column::SshUser,
        ] {
            m.alter_table(
                Table::alter()
                    .table(vm::Entity.table_ref())
                    .add_column(string_null(col).to_owned())
                    .to_owned(),
            )
            .await?;
        }
        m.alter_table(
            Table::alter()
                .table(image::Entity.table_ref())
                .add_column(string_null(image::Column::LoginUser).to_owned())
                .to_owned(),
        )
        .await?;
        Ok(())
    }
}

/// Environments (groups of VMs made and removed together), and an index
/// for the event stream's look at what changed lately.
struct M0006Environments;

impl MigrationName for M0006Environments {
    fn name(&self) -> &str {
        "m0006_environments"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for M0006Environments {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        use sea_orm::EntityName;
        m.create_table(
            Table::create()
                .table(environment::Entity.table_ref())
                .if_not_exists()
                .col(uuid(environment::Column::Id).primary_key())
                .col(uuid(environment::Column::ProjectId))
                .col(string(environment::Column::Name))
                .col(text(environment::Column::OsPrefixes))
                .col(string_null(environment::Column::FlavorName))
                .col(ts_null(environment::Column::ExpiresAt))
                .col(ts(environment::Column::CreatedAt))
                .col(ts_null(environment::Column::DeletedAt))
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("environments_project_name")
                .table(environment::Entity.table_ref())
                .col(environment::Column::ProjectId)
                .col(environment::Column::Name)
                .if_not_exists()
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(vm::Entity.table_ref())
                .add_column(uuid_null(vm::Column::EnvironmentId).to_owned())
                .to_owned(),
        )
        .await?;
        for (name, col) in [
            ("vms_environment", vm::Column::EnvironmentId),
            ("vms_updated_at", vm::Column::UpdatedAt),
        ] {
            m.create_index(
                Index::create()
                    .name(name)
                    .table(vm::Entity.table_ref())
                    .col(col)
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        }
        Ok(())
    }
}

/// Per-VM figures: each node's latest, kept on its row (one write per
/// heartbeat whatever the number of VMs).
struct M0007VmStats;

impl MigrationName for M0007VmStats {
    fn name(&self) -> &str {
        "m0007_vm_stats"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for M0007VmStats {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        use sea_orm::EntityName;
        m.alter_table(
            Table::alter()
                .table(node::Entity.table_ref())
                .add_column(text_null(node::Column::VmStats).to_owned())
                .to_owned(),
        )
        .await?;
        Ok(())
    }
}

/// Networks: each project's index in the bridged address plan (existing
/// projects numbered in the order they were made), and per VM the guest
/// ports to map, the outbound policy and what its node reported of its
/// network.
struct M0008Networks;

impl MigrationName for M0008Networks {
    fn name(&self) -> &str {
        "m0008_networks"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for M0008Networks {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        use sea_orm::EntityName;
        m.alter_table(
            Table::alter()
                .table(project::Entity.table_ref())
                .add_column(big_integer_null(project::Column::NetworkIndex).to_owned())
                .to_owned(),
        )
        .await?;
        // Portable SQL: both databases number the rows the same way.
        m.get_connection()
            .execute_unprepared(
                "UPDATE projects SET network_index = (SELECT COUNT(*) FROM projects p2 \
                 WHERE p2.created_at < projects.created_at \
                 OR (p2.created_at = projects.created_at AND p2.id < projects.id))",
            )
            .await?;
        m.create_index(
            Index::create()
                .name("projects_network_index")
                .table(project::Entity.table_ref())
                .col(project::Column::NetworkIndex)
                .unique()
                .if_not_exists()
                .to_owned(),
        )
        .await?;
        for col in [
            text(vm::Column::GuestPorts).default("[]").to_owned(),
            string(vm::Column::Egress).default("allow").to_owned(),
            text_null(vm::Column::Network).to_owned(),
        ] {
            m.alter_table(
                Table::alter()
                    .table(vm::Entity.table_ref())
                    .add_column(col)
                    .to_owned(),
            )
            .await?;
        }
        Ok(())
    }
}

/// Runs (run-code): their records, and how many a project may run at once.
struct M0009Runs;

impl MigrationName for M0009Runs {
    fn name(&self) -> &str {
        "m0009_runs"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for M0009Runs {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        use sea_orm::EntityName;
        m.create_table(
            Table::create()
                .table(run::Entity.table_ref())
                .if_not_exists()
                .col(uuid(run::Column::Id).primary_key())
                .col(uuid(run::Column::ProjectId))
                .col(string(run::Column::UserName))
                .col(string(run::Column::Language))
                .col(string(run::Column::CodeSha256))
                .col(string(run::Column::State))
                .col(integer_null(run::Column::ExitCode))
                .col(integer_null(run::Column::Signal))
                .col(text_null(run::Column::Message))
                .col(big_integer(run::Column::Vcpus))
                .col(big_integer(run::Column::MemoryMib))
                .col(big_integer(run::Column::TimeoutSecs))
                .col(uuid_null(run::Column::NodeId))
                .col(text(run::Column::Timings))
                .col(text(run::Column::Stdout))
                .col(text(run::Column::Stderr))
                .col(boolean(run::Column::OutputTruncated))
                .col(ts(run::Column::CreatedAt))
                .col(ts_null(run::Column::EndedAt))
                .to_owned(),
        )
        .await?;
        for (name, col) in [
            ("runs_project", run::Column::ProjectId),
            ("runs_state", run::Column::State),
        ] {
            m.create_index(
                Index::create()
                    .name(name)
                    .table(run::Entity.table_ref())
                    .col(col)
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        }
        m.alter_table(
            Table::alter()
                .table(project::Entity.table_ref())
                .add_column(
                    big_integer(project::Column::MaxConcurrentRuns)
                        .default(4)
                        .to_owned(),
                )
                .to_owned(),
        )
        .await?;
        Ok(())
    }
}

/// Invites: single-use links that let someone sign up (and join a project).
struct M0010Invites;

impl MigrationName for M0010Invites {
    fn name(&self) -> &str {
        "m0010_invites"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for M0010Invites {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        use sea_orm::EntityName;
        m.create_table(
            Table::create()
                .table(invite::Entity.table_ref())
                .if_not_exists()
                .col(uuid(invite::Column::Id).primary_key())
                .col(string(invite::Column::TokenHash).unique_key())
                .col(string(invite::Column::CreatedBy))
                .col(uuid_null(invite::Column::ProjectId))
                .col(string_null(invite::Column::Role))
                .col(ts(invite::Column::CreatedAt))
                .col(ts(invite::Column::ExpiresAt))
                .col(ts_null(invite::Column::UsedAt))
                .col(uuid_null(invite::Column::UsedBy))
                .to_owned(),
        )
        .await?;
        Ok(())
    }
}

/// Architectures and engines: what each node runs guests of (and how),
/// each VM's architecture, how its node runs it, and its engine.
struct M0011Platforms;

impl MigrationName for M0011Platforms {
    fn name(&self) -> &str {
        "m0011_platforms"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for M0011Platforms {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        use sea_orm::EntityName;
        m.alter_table(
            Table::alter()
                .table(node::Entity.table_ref())
                .add_column(text(node::Column::Platforms).default("[]").to_owned())
                .to_owned(),
        )
        .await?;
        for col in [
            string(vm::Column::Arch).default("x86_64").to_owned(),
            string_null(vm::Column::Execution).to_owned(),
            string(vm::Column::Engine).default("qemu").to_owned(),
        ] {
            m.alter_table(
                Table::alter()
                    .table(vm::Entity.table_ref())
                    .add_column(col)
                    .to_owned(),
            )
            .await?;
        }
        // The VMs made so far run their image's architecture.
        m.get_connection()
            .execute_unprepared(
                "UPDATE vms SET arch = COALESCE((SELECT arch FROM images \
                 WHERE images.id = vms.image_id), 'x86_64')",
            )
            .await?;
        Ok(())
    }
}

/// The engines each node lacks, and why (Firecracker without KVM, libvirt
/// without a connection).
struct M0012UnavailableEngines;

impl MigrationName for M0012UnavailableEngines {
    fn name(&self) -> &str {
        "m0012_unavailable_engines"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for M0012UnavailableEngines {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        use sea_orm::EntityName;
        m.alter_table(
            Table::alter()
                .table(node::Entity.table_ref())
                .add_column(
                    text(node::Column::UnavailableEngines)
                        .default("[]")
                        .to_owned(),
                )
                .to_owned(),
        )
        .await
    }
}

/// An index per filter of the VM list, each ending in the id its keyset
/// cursor walks: a page is a range read whatever the filter.
struct M0013ListIndexes;

impl MigrationName for M0013ListIndexes {
    fn name(&self) -> &str {
        "m0013_list_indexes"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for M0013ListIndexes {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        let db = m.get_connection();
        for sql in [
            "CREATE INDEX IF NOT EXISTS vms_live ON vms (id) WHERE deleted_at IS NULL",
            "CREATE INDEX IF NOT EXISTS vms_project_live ON vms (project_id, id) WHERE deleted_at IS NULL",
            "CREATE INDEX IF NOT EXISTS vms_state_id ON vms (state, id)",
            "CREATE INDEX IF NOT EXISTS vms_project_state_id ON vms (project_id, state, id)",
            "CREATE INDEX IF NOT EXISTS vms_name_id ON vms (name, id)",
            // A create's quota check sums its project's live VMs from
            // this index alone, not from their (wide) rows.
            "CREATE INDEX IF NOT EXISTS vms_project_usage ON vms (project_id, vcpus, memory_mib, disk_gib) WHERE deleted_at IS NULL",
            "DROP INDEX IF EXISTS vms_state",
        ] {
            db.execute_unprepared(sql).await?;
        }
        Ok(())
    }
}

/// A node's VMs by id with their change times, for a steady heartbeat's
/// one narrow read ([`crate::DataStore::vm_versions_for_node`]).
struct M0014NodeVersions;

impl MigrationName for M0014NodeVersions {
    fn name(&self) -> &str {
        "m0014_node_versions"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for M0014NodeVersions {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.get_connection()
            .execute_unprepared(
                "CREATE INDEX IF NOT EXISTS vms_node_versions ON vms (node_id, id, updated_at) \
                 WHERE state <> 'deleted'",
            )
            .await?;
        Ok(())
    }
}
