//! End to end, twenty VMs of one user started concurrently: all reach SSH, each with its own
//! address and TAP, and deleting them all (concurrently too) leaves nothing.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use banger_tests::e2e::{Output, Who, World};

const A: Who = Who::A;
const COUNT: usize = 20;

/// Runs `banger args(i)` for every VM at once; returns the outputs in order.
fn all_at_once(world: &World, args: impl Fn(&str) -> Vec<String> + Sync) -> Vec<Output> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..COUNT)
            .map(|i| {
                let args = &args;
                s.spawn(move || {
                    let name = format!("v{i:02}");
                    let a = args(&name);
                    let refs: Vec<&str> = a.iter().map(String::as_str).collect();
                    world.cli(A).timeout(Duration::from_secs(240)).banger(&refs)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("runner thread")).collect()
    })
}

#[test]
#[ignore = "needs root: creates users, namespaces and TAPs"]
fn twenty_concurrent_vms_all_reach_ssh_and_deleting_them_leaves_nothing() {
    let world = World::new();

    let start = Instant::now();
    let runs = all_at_once(&world, |n| {
        ["vm", "run", "--name", n, "--", "cat", "/etc/hostname"].map(String::from).to_vec()
    });
    let boot = start.elapsed();
    let failed: Vec<String> = runs.iter().filter(|o| !o.success()).map(|o| o.to_string()).collect();
    assert!(failed.is_empty(), "{} of {COUNT} `vm run` failed:\n{}", failed.len(), failed.join("\n"));
    for (i, out) in runs.iter().enumerate() {
        assert_eq!(out.stdout.trim(), format!("v{i:02}"), "{out}");
    }

    let vms = world.list(A);
    assert_eq!(vms.len(), COUNT, "{vms:#?}");
    assert!(vms.iter().all(|v| v.state == "running"), "{vms:#?}");
    let ips: BTreeSet<_> = vms.iter().filter_map(|v| v.guest_ip.clone()).collect();
    let taps: BTreeSet<_> = vms.iter().filter_map(|v| v.tap.clone()).collect();
    assert_eq!((ips.len(), taps.len()), (COUNT, COUNT), "addresses or TAPs are shared: {vms:#?}");
    let present: BTreeSet<String> = world.taps().into_iter().collect();
    assert!(taps.is_subset(&present), "TAPs {taps:?} vs links {present:?}");

    let start = Instant::now();
    let deletes = all_at_once(&world, |n| ["vm", "delete", n].map(String::from).to_vec());
    let teardown = start.elapsed();
    let failed: Vec<String> = deletes.iter().filter(|o| !o.success()).map(|o| o.to_string()).collect();
    assert!(failed.is_empty(), "{} of {COUNT} `vm delete` failed:\n{}", failed.len(), failed.join("\n"));
    assert!(world.list(A).is_empty(), "{:#?}", world.list(A));
    eprintln!(
        "{COUNT} VMs: concurrent `vm run` to SSH in {:.1}s, concurrent delete in {:.1}s",
        boot.as_secs_f64(),
        teardown.as_secs_f64()
    );
    world.assert_no_leaks();
}
