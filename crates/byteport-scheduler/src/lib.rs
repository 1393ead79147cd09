//! Placement as a pure function: given what the fleet has
//! ([`NodeInventory`]) and what a VM needs ([`Request`]), pick a node or
//! explain why none fits. No I/O: the control plane reads the inventory,
//! calls [`place`], and writes the decision and the node's reservation in
//! one transaction (which may still lose a race and retry).

/// One node as the scheduler sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInventory<Id> {
    pub id: Id,
    pub name: String,
    pub online: bool,
    pub cordoned: bool,
    pub region: String,
    /// The architectures it runs guests of.
    pub platforms: Vec<Platform>,
    /// The hypervisor engines it has (`qemu`, `microvm`).
    pub engines: Vec<String>,
    /// Engines it lacks, each with the reason it gave (engine, reason).
    pub unavailable: Vec<(String, String)>,
    pub capacity: Resources,
    pub reserved: Resources,
}

/// An architecture a node runs guests of: natively (hardware
/// virtualisation) or emulated (software, several times slower).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Platform {
    pub arch: String,
    pub native: bool,
}

impl Platform {
    pub fn native(arch: &str) -> Platform {
        Platform {
            arch: arch.into(),
            native: true,
        }
    }

    pub fn emulated(arch: &str) -> Platform {
        Platform {
            arch: arch.into(),
            native: false,
        }
    }
}

impl<Id> NodeInventory<Id> {
    /// How the node runs guests of `arch`: `Some(true)` natively,
    /// `Some(false)` emulated, `None` not at all.
    pub fn runs(&self, arch: &str) -> Option<bool> {
        self.platforms
            .iter()
            .find(|p| p.arch == arch)
            .map(|p| p.native)
    }
}

/// vCPUs, memory and disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    pub vcpus: i64,
    pub memory_mib: i64,
    pub disk_gib: i64,
}

/// How far reservations may exceed a node's capacity.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Overcommit {
    pub cpu: f64,
    pub memory: f64,
    pub disk: f64,
}

impl Default for Overcommit {
    /// CPU time is shared well; memory and disk are not.
    fn default() -> Self {
        Overcommit {
            cpu: 4.0,
            memory: 1.0,
            disk: 1.0,
        }
    }
}

impl Overcommit {
    /// What a node with this capacity may hold in reservations.
    pub fn limit(&self, cap: Resources) -> Resources {
        let scale = |v: i64, r: f64| (v as f64 * r).floor() as i64;
        Resources {
            vcpus: scale(cap.vcpus, self.cpu),
            memory_mib: scale(cap.memory_mib, self.memory),
            disk_gib: scale(cap.disk_gib, self.disk),
        }
    }
}

/// Spread VMs over nodes, or pack them onto as few as possible.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Policy {
    #[default]
    Spread,
    Pack,
}

/// What a VM needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request<Id> {
    pub size: Resources,
    pub arch: String,
    /// The engine the VM runs under: only nodes that have it.
    pub engine: String,
    /// Any region when absent.
    pub region: Option<String>,
    /// Nodes that already hold a VM of the same anti-affinity group.
    pub avoid: Vec<Id>,
}

/// The scheduler's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision<Id> {
    /// The node to use, and the reservation limit to check it against.
    Place { node: Id, limit: Resources },
    /// No node fits; the reason says what is missing.
    NoFit(String),
}

/// What one node is to one request.
enum Judged<'a> {
    /// Offline, cordoned, or not of the request's architecture or region.
    Out,
    /// It lacks the engine; the reason it gave, if any.
    NoEngine(Option<&'a str>),
    /// It holds a VM of the request's anti-affinity group.
    Avoided,
    /// Eligible, but with only this much free.
    Full(Resources),
    /// Eligible, with room: its score, whether it runs the architecture
    /// natively, its limit and what is free.
    Fits(f64, bool, Resources, Resources),
}

fn judge<'a, Id: PartialEq>(
    n: &'a NodeInventory<Id>,
    req: &Request<Id>,
    policy: Policy,
    over: Overcommit,
) -> Judged<'a> {
    if !n.online || n.cordoned {
        return Judged::Out;
    }
    let Some(native) = n.runs(&req.arch) else {
        return Judged::Out;
    };
    if !n.engines.contains(&req.engine) {
        let why = n
            .unavailable
            .iter()
            .find(|(e, _)| *e == req.engine)
            .map(|(_, r)| r.as_str());
        return Judged::NoEngine(why);
    }
    if req.region.as_ref().is_some_and(|r| *r != n.region) {
        return Judged::Out;
    }
    if req.avoid.contains(&n.id) {
        return Judged::Avoided;
    }
    let limit = over.limit(n.capacity);
    let free = Resources {
        vcpus: limit.vcpus - n.reserved.vcpus,
        memory_mib: limit.memory_mib - n.reserved.memory_mib,
        disk_gib: limit.disk_gib - n.reserved.disk_gib,
    };
    if free.vcpus < req.size.vcpus
        || free.memory_mib < req.size.memory_mib
        || free.disk_gib < req.size.disk_gib
    {
        return Judged::Full(free);
    }
    let share = (free.memory_mib - req.size.memory_mib) as f64 / limit.memory_mib.max(1) as f64;
    // The share is within [-1, 1]: native comes first whatever it is.
    let score = match policy {
        Policy::Spread => share,
        Policy::Pack => -share,
    } + if native { 4.0 } else { 0.0 };
    Judged::Fits(score, native, limit, free)
}

/// Fleets larger than this are sampled by [`place_sampled`].
pub const SAMPLE_ABOVE: usize = 64;
/// Nodes with room that [`place_sampled`] compares.
pub const SAMPLE: usize = 4;

/// [`place`] for `Spread` on a large fleet, without looking at every
/// node: nodes are visited in an order drawn from `seed` until
/// [`SAMPLE`] with room are found (only natively running ones count when
/// `natives` says some node runs the architecture natively), and the best
/// of those is taken. The cost is flat in the fleet's size while room is
/// common, and control-plane replicas deciding at once (each with its own
/// seed) spread over different nodes instead of all picking the one
/// emptiest. Small fleets, `Pack`, and a request that finds no room in
/// the sample get [`place`] itself (with its reasons).
pub fn place_sampled<Id: Clone + PartialEq>(
    nodes: &[NodeInventory<Id>],
    req: &Request<Id>,
    policy: Policy,
    over: Overcommit,
    natives: bool,
    seed: u64,
) -> Decision<Id> {
    let n = nodes.len();
    if policy != Policy::Spread || n <= SAMPLE_ABOVE {
        return place(nodes, req, policy, over);
    }
    // A walk start + j * stride (mod n), stride prime to n, visits every
    // node once.
    let start = (seed % n as u64) as usize;
    let mut stride = ((seed >> 32) % n as u64) as usize | 1;
    while gcd(stride, n) != 1 {
        stride += 2;
    }
    let mut best: Option<(f64, &NodeInventory<Id>, Resources)> = None;
    let mut found = 0;
    for j in 0..n {
        let node = &nodes[(start + j * stride) % n];
        if let Judged::Fits(score, native, limit, _) = judge(node, req, policy, over) {
            if natives && !native {
                continue;
            }
            if best.as_ref().is_none_or(|(s, _, _)| score > *s) {
                best = Some((score, node, limit));
            }
            found += 1;
            if found == SAMPLE {
                break;
            }
        }
    }
    match best {
        Some((_, node, limit)) => Decision::Place {
            node: node.id.clone(),
            limit,
        },
        None => place(nodes, req, policy, over),
    }
}

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Picks a node for `req`. Only nodes that run the request's architecture
/// pass, and one that runs it natively beats every one that emulates it.
/// Among the rest, `Spread` takes the one with the largest free memory
/// share, `Pack` the smallest; ties go to the first in inventory order.
pub fn place<Id: Clone + PartialEq>(
    nodes: &[NodeInventory<Id>],
    req: &Request<Id>,
    policy: Policy,
    over: Overcommit,
) -> Decision<Id> {
    let mut best: Option<(f64, &NodeInventory<Id>, Resources)> = None;
    let mut eligible = 0usize;
    let mut avoided = 0usize;
    let mut lack_engine = 0usize;
    let mut why_no_engine: Option<String> = None;
    let mut largest_free = Resources::default();
    let mut largest_on = None;
    for n in nodes {
        let free = match judge(n, req, policy, over) {
            Judged::Out => continue,
            Judged::NoEngine(why) => {
                lack_engine += 1;
                if why_no_engine.is_none() {
                    why_no_engine = why.map(|r| format!(" ({}: {r})", n.name));
                }
                continue;
            }
            Judged::Avoided => {
                avoided += 1;
                continue;
            }
            Judged::Full(free) => free,
            Judged::Fits(score, _, limit, free) => {
                if best.as_ref().is_none_or(|(s, _, _)| score > *s) {
                    best = Some((score, n, limit));
                }
                free
            }
        };
        eligible += 1;
        if free.memory_mib > largest_free.memory_mib || largest_on.is_none() {
            largest_free = free;
            largest_on = Some(n.name.as_str());
        }
    }
    match best {
        Some((_, n, limit)) => Decision::Place {
            node: n.id.clone(),
            limit,
        },
        None if eligible == 0 && avoided == 0 && lack_engine > 0 => Decision::NoFit(format!(
            "no online node that runs {} guests has the {} engine{}",
            req.arch,
            req.engine,
            why_no_engine.unwrap_or_default()
        )),
        None if eligible == 0 && avoided > 0 => Decision::NoFit(format!(
            "every one of the {avoided} eligible node(s) already holds a VM of its anti-affinity group"
        )),
        None if eligible == 0 => Decision::NoFit(match &req.region {
            Some(r) => format!("no online node runs {} guests in region {r}", req.arch),
            None => format!("no online node runs {} guests", req.arch),
        }),
        None => Decision::NoFit(format!(
            "no node has {} vCPU, {} MiB memory and {} GiB disk free; the most memory free is {} MiB (with {} vCPU, {} GiB disk) on {}",
            req.size.vcpus,
            req.size.memory_mib,
            req.size.disk_gib,
            largest_free.memory_mib,
            largest_free.vcpus,
            largest_free.disk_gib,
            largest_on.unwrap_or("?"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u32, mem: i64, reserved_mem: i64) -> NodeInventory<u32> {
        NodeInventory {
            id,
            name: format!("node-{id}"),
            online: true,
            cordoned: false,
            region: "default".into(),
            platforms: vec![Platform::native("x86_64")],
            engines: vec!["qemu".into()],
            unavailable: Vec::new(),
            capacity: Resources {
                vcpus: 4,
                memory_mib: mem,
                disk_gib: 100,
            },
            reserved: Resources {
                vcpus: 0,
                memory_mib: reserved_mem,
                disk_gib: 0,
            },
        }
    }

    fn req(mem: i64) -> Request<u32> {
        Request {
            size: Resources {
                vcpus: 1,
                memory_mib: mem,
                disk_gib: 5,
            },
            arch: "x86_64".into(),
            engine: "qemu".into(),
            region: None,
            avoid: Vec::new(),
        }
    }

    fn chosen(d: Decision<u32>) -> Option<u32> {
        match d {
            Decision::Place { node, .. } => Some(node),
            Decision::NoFit(_) => None,
        }
    }

    #[test]
    fn spread_takes_the_emptiest_and_pack_the_fullest() {
        let nodes = [
            node(1, 8192, 4096),
            node(2, 8192, 1024),
            node(3, 8192, 6144),
        ];
        let o = Overcommit::default();
        assert_eq!(chosen(place(&nodes, &req(512), Policy::Spread, o)), Some(2));
        assert_eq!(chosen(place(&nodes, &req(512), Policy::Pack, o)), Some(3));
        // Pack skips a node the VM does not fit on.
        assert_eq!(chosen(place(&nodes, &req(3000), Policy::Pack, o)), Some(1));
    }

    #[test]
    fn never_over_capacity_and_says_why() {
        let nodes = [node(1, 4096, 4000), node(2, 2048, 0)];
        match place(&nodes, &req(3000), Policy::Spread, Overcommit::default()) {
            Decision::NoFit(why) => {
                assert!(why.contains("3000 MiB"), "{why}");
                assert!(why.contains("2048 MiB") && why.contains("node-2"), "{why}");
            }
            d => panic!("placed over capacity: {d:?}"),
        }
    }

    #[test]
    fn offline_cordoned_and_foreign_nodes_are_skipped() {
        let mut a = node(1, 8192, 0);
        a.online = false;
        let mut b = node(2, 8192, 0);
        b.cordoned = true;
        let mut c = node(3, 8192, 0);
        c.platforms = vec![Platform::native("aarch64")];
        let d = place(&[a, b, c], &req(512), Policy::Spread, Overcommit::default());
        assert_eq!(
            d,
            Decision::NoFit("no online node runs x86_64 guests".into())
        );
        let mut r = req(512);
        r.region = Some("eu-1".into());
        let d = place(
            &[node(4, 8192, 0)],
            &r,
            Policy::Spread,
            Overcommit::default(),
        );
        assert_eq!(
            d,
            Decision::NoFit("no online node runs x86_64 guests in region eu-1".into())
        );
    }

    #[test]
    fn a_foreign_architecture_goes_where_it_runs_natively_before_where_it_is_emulated() {
        let mut arm = req(512);
        arm.arch = "aarch64".into();
        let plain = node(1, 8192, 0);
        let mut emulating = node(2, 8192, 0);
        emulating.platforms.push(Platform::emulated("aarch64"));
        let mut native = node(3, 8192, 6000);
        native.platforms = vec![Platform::native("aarch64")];
        let o = Overcommit::default();
        // Only the nodes that run aarch64 at all, and the native one first
        // even though it is the fullest.
        for policy in [Policy::Spread, Policy::Pack] {
            let nodes = [plain.clone(), emulating.clone(), native.clone()];
            assert_eq!(chosen(place(&nodes, &arm, policy, o)), Some(3));
        }
        let nodes = [plain.clone(), emulating.clone()];
        assert_eq!(chosen(place(&nodes, &arm, Policy::Spread, o)), Some(2));
        assert_eq!(
            place(&[plain], &arm, Policy::Spread, o),
            Decision::NoFit("no online node runs aarch64 guests".into())
        );
        // x86_64 still lands on an x86_64 node, emulating one or not.
        assert_eq!(chosen(place(&nodes, &req(512), Policy::Spread, o)), Some(1));
    }

    #[test]
    fn a_vm_goes_only_where_its_engine_is() {
        let mut micro = req(512);
        micro.engine = "microvm".into();
        let plain = node(1, 8192, 0);
        let mut both = node(2, 8192, 6000);
        both.engines.push("microvm".into());
        let o = Overcommit::default();
        let nodes = [plain.clone(), both];
        assert_eq!(chosen(place(&nodes, &micro, Policy::Spread, o)), Some(2));
        assert_eq!(chosen(place(&nodes, &req(512), Policy::Spread, o)), Some(1));
        assert_eq!(
            place(&[plain], &micro, Policy::Spread, o),
            Decision::NoFit("no online node that runs x86_64 guests has the microvm engine".into())
        );
        // A node that says why it lacks an engine: the reason is passed on.
        let mut fc = req(512);
        fc.engine = "firecracker".into();
        let mut said = node(1, 8192, 0);
        said.unavailable = vec![("firecracker".into(), "it needs KVM".into())];
        assert_eq!(
            place(&[said], &fc, Policy::Spread, o),
            Decision::NoFit(
                "no online node that runs x86_64 guests has the firecracker engine (node-1: it needs KVM)"
                    .into()
            )
        );
    }

    #[test]
    fn anti_affinity_skips_nodes_of_the_group() {
        let nodes = [node(1, 8192, 0), node(2, 8192, 4096)];
        let mut r = req(512);
        r.avoid = vec![1];
        assert_eq!(
            chosen(place(&nodes, &r, Policy::Spread, Overcommit::default())),
            Some(2)
        );
        r.avoid = vec![1, 2];
        match place(&nodes, &r, Policy::Spread, Overcommit::default()) {
            Decision::NoFit(why) => assert!(why.contains("anti-affinity"), "{why}"),
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn cpu_overcommit_allows_more_vcpus_than_cores() {
        let mut n = node(1, 65536, 0);
        n.reserved.vcpus = 15;
        let d = place(&[n], &req(512), Policy::Spread, Overcommit::default());
        assert!(matches!(d, Decision::Place { node: 1, limit } if limit.vcpus == 16));
    }

    #[test]
    fn a_sampled_spread_stays_within_limits_prefers_natives_and_spreads_across_seeds() {
        let o = Overcommit::default();
        // 1,000 nodes, only every tenth with room; one native arm64 node.
        let mut nodes: Vec<_> = (0..1000)
            .map(|i| node(i, 4096, if i % 10 == 0 { 0 } else { 4000 }))
            .collect();
        nodes[999].platforms.push(Platform::native("arm64"));
        let mut chosen_by_seed = std::collections::HashSet::new();
        for seed in 0..200u64 {
            let seed = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            match place_sampled(&nodes, &req(512), Policy::Spread, o, true, seed) {
                Decision::Place { node, .. } => {
                    assert_eq!(node % 10, 0, "node-{node} has no room");
                    chosen_by_seed.insert(node);
                }
                d => panic!("{d:?}"),
            }
        }
        // Different seeds, different nodes: replicas do not herd.
        assert!(chosen_by_seed.len() > 20, "{chosen_by_seed:?}");
        // arm64 runs natively on one node only and is emulated on the
        // ones with room. While the native one is full, an emulating one
        // is taken (as the full scan does); once it has room, it wins.
        for n in nodes.iter_mut().step_by(10) {
            n.platforms.push(Platform::emulated("arm64"));
        }
        let mut arm = req(512);
        arm.arch = "arm64".into();
        let d = place_sampled(&nodes, &arm, Policy::Spread, o, true, 7);
        assert!(
            chosen(d).is_some_and(|n| n % 10 == 0),
            "an emulating node with room"
        );
        nodes[999].reserved.memory_mib = 0;
        assert_eq!(
            chosen(place_sampled(&nodes, &arm, Policy::Spread, o, true, 7)),
            Some(999)
        );
        // Nowhere with room: the same reason as the full scan gives.
        for n in &mut nodes {
            n.reserved.memory_mib = 4000;
        }
        assert_eq!(
            place_sampled(&nodes, &req(512), Policy::Spread, o, true, 3),
            place(&nodes, &req(512), Policy::Spread, o)
        );
    }
}
