//! Flavors (instance types) and the image catalog. Everyone logged in reads
//! them; admins change them.

use super::{App, Ctx, to_u32, to_u64};
use crate::error::{AppError, AppResult};
use byteport_store::{flavor, image};
use byteport_types::api::{BootMode, Flavor, FlavorCreate, Image, ImageCreate};
use byteport_types::{FlavorId, ImageId, Name};
use chrono::Utc;
use uuid::Uuid;

/// The flavors every installation starts with: (name, vCPUs, MiB, GiB).
pub const SEED_FLAVORS: [(&str, u32, u64, u64); 5] = [
    ("m1.tiny", 1, 512, 5),
    ("m1.small", 1, 2048, 10),
    ("m1.medium", 2, 4096, 20),
    ("m1.large", 4, 8192, 40),
    ("m1.xlarge", 8, 16384, 80),
];

/// Limits of one VM's size: above these a request is absurd.
pub const MAX_VCPUS: u32 = 256;
pub const MAX_MEMORY_MIB: u64 = 4 * 1024 * 1024;
pub const MAX_DISK_GIB: u64 = 64 * 1024;
pub const MIN_MEMORY_MIB: u64 = 64;

pub(crate) async fn seed_flavors(app: &App) -> AppResult<()> {
    for (name, vcpus, mem, disk) in SEED_FLAVORS {
        app.store
            .flavor_seed(flavor::Model {
                id: Uuid::now_v7(),
                name: name.into(),
                vcpus: i64::from(vcpus),
                memory_mib: mem as i64,
                disk_gib: disk as i64,
                created_at: Utc::now(),
            })
            .await?;
    }
    Ok(())
}

/// Checks a VM or flavor size against the absolute limits.
pub fn check_size(vcpus: u32, memory_mib: u64, disk_gib: u64) -> AppResult<()> {
    let bad = |m: String| Err(AppError::bad("invalid_size", m));
    if !(1..=MAX_VCPUS).contains(&vcpus) {
        return bad(format!(
            "vcpus is {vcpus}; it must be between 1 and {MAX_VCPUS}"
        ));
    }
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&memory_mib) {
        return bad(format!(
            "memory_mib is {memory_mib}; it must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB}"
        ));
    }
    if !(1..=MAX_DISK_GIB).contains(&disk_gib) {
        return bad(format!(
            "disk_gib is {disk_gib}; it must be between 1 and {MAX_DISK_GIB}"
        ));
    }
    Ok(())
}

fn flavor_view(f: &flavor::Model) -> AppResult<Flavor> {
    Ok(Flavor {
        id: FlavorId(f.id),
        name: Name::parse(&f.name).map_err(AppError::internal)?,
        vcpus: to_u32(f.vcpus),
        memory_mib: to_u64(f.memory_mib),
        disk_gib: to_u64(f.disk_gib),
    })
}

pub(crate) fn image_view(i: &image::Model) -> AppResult<Image> {
    Ok(Image {
        id: ImageId(i.id),
        name: Name::parse(&i.name).map_err(AppError::internal)?,
        os_family: i.os_family.clone(),
        os_version: i.os_version.clone(),
        arch: i.arch.clone(),
        format: i.format.clone(),
        size_bytes: to_u64(i.size_bytes),
        sha256: i.sha256.clone(),
        boot: if i.boot == "kernel" {
            BootMode::Kernel
        } else {
            BootMode::Disk
        },
        kernel_sha256: i.kernel_sha256.clone(),
        initrd_sha256: i.initrd_sha256.clone(),
        cmdline: i.cmdline.clone(),
        has_agent: i.has_agent,
        login_user: i.login_user.clone(),
        status: i.status.clone(),
        created_at: i.created_at,
    })
}

fn check_sha256(field: &str, v: &str) -> AppResult<()> {
    if v.len() != 64 || !v.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(AppError::bad(
            "invalid_sha256",
            format!("{field} must be 64 lowercase hex digits"),
        ));
    }
    Ok(())
}

/// A short word: OS family, version, architecture.
/// The longest OS family, version or architecture word.
pub(crate) const MAX_WORD: usize = 32;
/// The disk formats the catalogue takes.
pub(crate) const FORMATS: [&str; 3] = ["qcow2", "raw", "initramfs"];

pub(crate) fn check_word(field: &str, v: &str) -> AppResult<()> {
    let ok = !v.is_empty()
        && v.len() <= MAX_WORD
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if !ok {
        return Err(AppError::bad(
            "invalid_field",
            format!("{field} must be 1-{MAX_WORD} characters of letters, digits, '.', '-' and '_'"),
        ));
    }
    Ok(())
}

impl App {
    pub async fn flavor_list(&self, ctx: &Ctx) -> AppResult<Vec<Flavor>> {
        ctx.user()?;
        self.store
            .flavor_list()
            .await?
            .iter()
            .map(flavor_view)
            .collect()
    }

    pub async fn flavor_create(&self, ctx: &Ctx, req: FlavorCreate) -> AppResult<Flavor> {
        ctx.admin()?;
        check_size(req.vcpus, req.memory_mib, req.disk_gib)?;
        let f = self
            .store
            .flavor_insert(flavor::Model {
                id: Uuid::now_v7(),
                name: req.name.to_string(),
                vcpus: i64::from(req.vcpus),
                memory_mib: req.memory_mib as i64,
                disk_gib: req.disk_gib as i64,
                created_at: Utc::now(),
            })
            .await?;
        ctx.target("flavor", f.id, None);
        flavor_view(&f)
    }

    pub async fn flavor_delete(&self, ctx: &Ctx, name: &str) -> AppResult<()> {
        ctx.admin()?;
        ctx.target("flavor", name, None);
        self.store
            .flavor_delete(name)
            .await
            .map_err(|_| AppError::not_found("flavor", name))
    }

    pub async fn image_list(&self, ctx: &Ctx) -> AppResult<Vec<Image>> {
        ctx.user()?;
        self.store
            .image_list()
            .await?
            .iter()
            .map(image_view)
            .collect()
    }

    pub async fn image_show(&self, ctx: &Ctx, name: &str) -> AppResult<Image> {
        ctx.user()?;
        let i = self.store.image_fetch_by_name(name).await?;
        image_view(&i.ok_or_else(|| AppError::not_found("image", name))?)
    }

    pub async fn image_create(&self, ctx: &Ctx, req: ImageCreate) -> AppResult<Image> {
        ctx.admin()?;
        check_word("os_family", &req.os_family)?;
        check_word("os_version", &req.os_version)?;
        check_word("arch", &req.arch)?;
        if !FORMATS.contains(&req.format.as_str()) {
            return Err(AppError::bad(
                "invalid_format",
                format!(
                    "format {:?} is not one of qcow2, raw, initramfs",
                    req.format
                ),
            ));
        }
        check_sha256("sha256", &req.sha256)?;
        if req.size_bytes == 0 || req.size_bytes > MAX_DISK_GIB * byteport_types::GIB {
            return Err(AppError::bad(
                "invalid_size",
                "size_bytes must be between 1 and 64 TiB",
            ));
        }
        if req.boot == BootMode::Kernel && req.kernel_sha256.is_none() {
            return Err(AppError::bad(
                "invalid_boot",
                "a kernel-booted image needs kernel_sha256",
            ));
        }
        for (f, v) in [
            ("kernel_sha256", &req.kernel_sha256),
            ("initrd_sha256", &req.initrd_sha256),
        ] {
            if let Some(v) = v {
                check_sha256(f, v)?;
            }
        }
        if let Some(c) = &req.cmdline
            && (c.len() > 1024 || c.chars().any(|ch| ch.is_control()))
        {
            return Err(AppError::bad(
                "invalid_cmdline",
                "cmdline must be at most 1024 characters without control characters",
            ));
        }
        if let Some(u) = &req.login_user {
            let mut b = u.bytes();
            let first_ok = b
                .next()
                .is_some_and(|c| c.is_ascii_lowercase() || c == b'_');
            if !first_ok
                || u.len() > 32
                || !b
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-')
            {
                return Err(AppError::bad(
                    "invalid_login_user",
                    "login_user must be a user name: 1-32 of a-z, 0-9, '_' and '-', starting with a letter or '_'",
                ));
            }
        }
        let i = self
            .store
            .image_insert(image::Model {
                id: Uuid::now_v7(),
                name: req.name.to_string(),
                os_family: req.os_family,
                os_version: req.os_version,
                arch: req.arch,
                format: req.format,
                size_bytes: req.size_bytes as i64,
                sha256: req.sha256,
                boot: if req.boot == BootMode::Kernel {
                    "kernel"
                } else {
                    "disk"
                }
                .into(),
                kernel_sha256: req.kernel_sha256,
                initrd_sha256: req.initrd_sha256,
                cmdline: req.cmdline,
                has_agent: req.has_agent,
                status: "registered".into(),
                created_at: Utc::now(),
                login_user: req.login_user,
            })
            .await?;
        ctx.target("image", i.id, None);
        image_view(&i)
    }

    pub async fn image_delete(&self, ctx: &Ctx, name: &str) -> AppResult<()> {
        ctx.admin()?;
        let i = self
            .store
            .image_fetch_by_name(name)
            .await?
            .ok_or_else(|| AppError::not_found("image", name))?;
        ctx.target("image", i.id, None);
        self.store.image_delete(i.id).await?;
        Ok(())
    }
}
