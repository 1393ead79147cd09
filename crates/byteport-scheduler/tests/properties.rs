//! Properties of placement over random fleets and request streams: the
//! scheduler never books a node past its capacity (after overcommit), keeps
//! to the region, and spread and pack do what their names say.

use byteport_scheduler::{
    Decision, NodeInventory, Overcommit, Platform, Policy, Request, Resources, place,
};
use proptest::prelude::*;

fn fleet() -> impl Strategy<Value = Vec<NodeInventory<usize>>> {
    prop::collection::vec(
        (1i64..=16, 1i64..=64, 10i64..=500, any::<bool>(), 0usize..3),
        1..12,
    )
    .prop_map(|specs| {
        specs
            .into_iter()
            .enumerate()
            .map(|(i, (cpu, gib, disk, online, region))| NodeInventory {
                id: i,
                name: format!("node-{i}"),
                online,
                cordoned: false,
                region: format!("r{region}"),
                platforms: vec![Platform::native("x86_64")],
                engines: vec!["qemu".into()],
                unavailable: Vec::new(),
                capacity: Resources {
                    vcpus: cpu,
                    memory_mib: gib * 1024,
                    disk_gib: disk,
                },
                reserved: Resources::default(),
            })
            .collect()
    })
}

fn requests() -> impl Strategy<Value = Vec<(i64, i64, i64, Option<usize>)>> {
    prop::collection::vec(
        (
            1i64..=8,
            256i64..=16384,
            1i64..=80,
            prop::option::of(0usize..3),
        ),
        1..80,
    )
}

/// Places every request in turn, reserving what each decision takes.
fn run(
    nodes: &mut [NodeInventory<usize>],
    reqs: &[(i64, i64, i64, Option<usize>)],
    policy: Policy,
) -> Vec<Option<usize>> {
    let over = Overcommit::default();
    reqs.iter()
        .map(|&(cpu, mem, disk, region)| {
            let r = Request {
                size: Resources {
                    vcpus: cpu,
                    memory_mib: mem,
                    disk_gib: disk,
                },
                arch: "x86_64".into(),
                engine: "qemu".into(),
                region: region.map(|g| format!("r{g}")),
                avoid: Vec::new(),
            };
            match place(nodes, &r, policy, over) {
                Decision::Place { node, .. } => {
                    let n = &mut nodes[node];
                    assert!(n.online, "placed on an offline node");
                    if let Some(g) = &r.region {
                        assert_eq!(&n.region, g, "placed outside the region");
                    }
                    n.reserved.vcpus += cpu;
                    n.reserved.memory_mib += mem;
                    n.reserved.disk_gib += disk;
                    Some(node)
                }
                Decision::NoFit(why) => {
                    assert!(!why.is_empty());
                    None
                }
            }
        })
        .collect()
}

proptest! {
    #[test]
    fn never_over_capacity_and_always_in_region(
        mut nodes in fleet(), reqs in requests(), pack in any::<bool>()
    ) {
        let policy = if pack { Policy::Pack } else { Policy::Spread };
        run(&mut nodes, &reqs, policy);
        let over = Overcommit::default();
        for n in &nodes {
            let limit = over.limit(n.capacity);
            prop_assert!(n.reserved.vcpus <= limit.vcpus);
            prop_assert!(n.reserved.memory_mib <= limit.memory_mib);
            prop_assert!(n.reserved.disk_gib <= limit.disk_gib);
        }
    }

    #[test]
    fn a_request_that_fits_somewhere_is_placed(
        mut nodes in fleet(), reqs in requests()
    ) {
        let over = Overcommit::default();
        for (i, &(cpu, mem, disk, region)) in reqs.iter().enumerate() {
            let fits = nodes.iter().any(|n| {
                let l = over.limit(n.capacity);
                n.online
                    && region.is_none_or(|g| n.region == format!("r{g}"))
                    && n.reserved.vcpus + cpu <= l.vcpus
                    && n.reserved.memory_mib + mem <= l.memory_mib
                    && n.reserved.disk_gib + disk <= l.disk_gib
            });
            let got = run(&mut nodes, &reqs[i..=i], Policy::Spread)[0];
            prop_assert_eq!(fits, got.is_some());
        }
    }

    /// Equal nodes and equal VMs: spread keeps them within one VM of each
    /// other; pack fills a node before it opens the next.
    #[test]
    fn spread_balances_and_pack_fills(count in 2usize..8, vms in 1usize..40) {
        let equal = |i: usize| NodeInventory {
            id: i,
            name: format!("n{i}"),
            online: true,
            cordoned: false,
            region: "r0".into(),
            platforms: vec![Platform::native("x86_64")],
                engines: vec!["qemu".into()],
                unavailable: Vec::new(),
            capacity: Resources { vcpus: 64, memory_mib: 8 * 1024, disk_gib: 1000 },
            reserved: Resources::default(),
        };
        let reqs = vec![(1, 1024, 10, None); vms];
        let mut spread: Vec<_> = (0..count).map(equal).collect();
        run(&mut spread, &reqs, Policy::Spread);
        let per: Vec<i64> = spread.iter().map(|n| n.reserved.memory_mib / 1024).collect();
        let (lo, hi) = (per.iter().min().unwrap(), per.iter().max().unwrap());
        prop_assert!(hi - lo <= 1, "spread left {per:?}");

        let mut pack: Vec<_> = (0..count).map(equal).collect();
        run(&mut pack, &reqs, Policy::Pack);
        let per: Vec<i64> = pack.iter().map(|n| n.reserved.memory_mib / 1024).collect();
        let used = per.iter().filter(|&&v| v > 0).count();
        let needed = vms.min(8 * count).div_ceil(8);
        prop_assert_eq!(used, needed, "pack used {:?}", per);
    }
}
