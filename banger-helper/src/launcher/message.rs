//! The messages between the helper and its launcher: one [`Order`] from the helper, answered by
//! one [`Answer`], on the socketpair that joins them, with the protocol crate's frames (a length
//! prefix, [`banger_protocol::MAX_FRAME_LEN`] at most, descriptors beside the frame as
//! SCM_RIGHTS, at most [`banger_protocol::MAX_FDS_PER_FRAME`]).
//!
//! The launcher checks every order again after decoding it ([`Order::check`]): ids, names,
//! counts and a VM's shape within its user's totals (which become cgroup limits) are the
//! helper's, but the launcher holds capabilities the helper dropped, so nothing it acts on is
//! taken unchecked. A message that does not decode or check ends the conversation.

use banger_protocol::{IfName, MAX_VCPUS, MIN_MEM_MIB};
use nix::errno::Errno;
use serde::{Deserialize, Serialize};

use crate::jail::MAX_ID_LEN;
use crate::kernel::{JailOrder, JailState, KernelError};

/// The most jails one [`Answer::Listed`] carries: with ids of at most [`MAX_ID_LEN`] bytes this
/// keeps the answer well under a frame.
pub const MAX_LISTED: usize = 512;

/// The longest per-user cgroup path (relative to each hierarchy).
pub const MAX_CGROUP_LEN: usize = 255;

/// The longest text in a [`Failure`] (longer texts are cut).
pub const MAX_TEXT_LEN: usize = 1024;

/// What the helper asks of the launcher.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Order {
    /// Build a jail and start the jailer in it; the files travel beside the frame, in
    /// [`banger_protocol::JailFiles`] order.
    Launch(JailOrder),
    /// Kill a jail's VMM and remove the jail.
    Remove {
        /// The jail id.
        id: String,
        /// The jail's uid.
        uid: u32,
        /// The PID its VMM had, if known.
        pid: Option<i32>,
    },
    /// List the jails under the chroot base.
    List,
}

/// The launcher's answer to one [`Order`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Answer {
    /// The jail runs; the VMM's host PID.
    Launched(i32),
    /// The jail is gone.
    Removed,
    /// The jails under the chroot base.
    Listed(Vec<JailState>),
    /// The order failed.
    Failed(Failure),
}

/// [`KernelError`] on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// The operation that failed.
    pub op: String,
    /// What it was applied to.
    pub object: String,
    /// The errno, when the failure has one.
    pub errno: Option<i32>,
    /// What went wrong, when it has no errno.
    pub detail: String,
}

/// Why a decoded message is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// A jail id is not 1–64 of `[a-z0-9-]`.
    #[error("jail id {0:?} is not 1-{MAX_ID_LEN} characters of [a-z0-9-]")]
    Id(String),
    /// A cgroup path is not `[a-z0-9-]` components joined by `/`.
    #[error("cgroup {0:?} is not 1-{MAX_CGROUP_LEN} characters of [a-zA-Z0-9_-] components joined by /")]
    Cgroup(String),
    /// A TAP name is not an interface name.
    #[error("TAP name {0:?} is not an interface name")]
    Tap(String),
    /// A uid is root's.
    #[error("uid {0} is root's: a jail never runs as root, and root is never its caller")]
    Root(u32),
    /// The descriptors do not match the files.
    #[error("{got} descriptors came with an order for {want}")]
    Fds {
        /// Descriptors received.
        got: usize,
        /// Descriptors the order names.
        want: usize,
    },
    /// A listing is longer than [`MAX_LISTED`].
    #[error("{0} jails listed, over the {MAX_LISTED} an answer may carry")]
    TooMany(usize),
    /// A PID is not positive.
    #[error("PID {0} is not a process id")]
    Pid(i32),
    /// A VM's shape is out of bounds or over the user's totals.
    #[error(
        "a vm of {vcpus} vcpus and {mem_mib} MiB is not 1-{MAX_VCPUS} vcpus and at least {MIN_MEM_MIB} MiB within the user's totals"
    )]
    Shape {
        /// Its vCPUs.
        vcpus: u8,
        /// Its memory in MiB.
        mem_mib: u32,
    },
}

fn check_id(id: &str) -> Result<(), Malformed> {
    if crate::jail::valid_id(id) { Ok(()) } else { Err(Malformed::Id(id.to_owned())) }
}

fn check_cgroup(path: &str) -> Result<(), Malformed> {
    let ok = (1..=MAX_CGROUP_LEN).contains(&path.len())
        && path
            .split('/')
            .all(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
    if ok { Ok(()) } else { Err(Malformed::Cgroup(path.to_owned())) }
}

fn check_pid(pid: Option<i32>) -> Result<(), Malformed> {
    match pid {
        Some(p) if p <= 0 => Err(Malformed::Pid(p)),
        _ => Ok(()),
    }
}

impl Order {
    /// Checks a decoded order and the descriptors that came with it.
    pub fn check(&self, fds: usize) -> Result<(), Malformed> {
        let want = match self {
            Order::Launch(o) => {
                check_id(&o.id)?;
                check_cgroup(&o.user_cgroup)?;
                let (shape, totals) = (o.shape, o.user_limits);
                if !(1..=MAX_VCPUS).contains(&shape.vcpus)
                    || shape.mem_mib < MIN_MEM_MIB
                    || u32::from(shape.vcpus) > totals.vcpus
                    || u64::from(shape.mem_mib) > totals.mem_mib
                {
                    return Err(Malformed::Shape { vcpus: shape.vcpus, mem_mib: shape.mem_mib });
                }
                for uid in [o.uid, o.caller] {
                    if uid == 0 {
                        return Err(Malformed::Root(uid));
                    }
                }
                if let Some(tap) = &o.tap {
                    IfName::new(tap.clone()).map_err(|_| Malformed::Tap(tap.clone()))?;
                }
                o.files.count()
            }
            Order::Remove { id, uid, pid } => {
                check_id(id)?;
                // uid 0 is "not known" (a leftover directory whose jailer never gave it one):
                // nothing is killed then, so no PID may come with it.
                if *uid == 0 && pid.is_some() {
                    return Err(Malformed::Root(0));
                }
                check_pid(*pid)?;
                0
            }
            Order::List => 0,
        };
        if fds == want { Ok(()) } else { Err(Malformed::Fds { got: fds, want }) }
    }
}

impl Answer {
    /// Checks a decoded answer (the helper's side).
    pub fn check(&self) -> Result<(), Malformed> {
        match self {
            Answer::Launched(pid) => check_pid(Some(*pid)),
            Answer::Listed(jails) => {
                if jails.len() > MAX_LISTED {
                    return Err(Malformed::TooMany(jails.len()));
                }
                for j in jails {
                    check_id(&j.id)?;
                    check_pid(j.pid)?;
                }
                Ok(())
            }
            Answer::Removed | Answer::Failed(_) => Ok(()),
        }
    }

    /// The answer to a listing: every jail, or a failure when there are more than an answer
    /// carries.
    pub fn listed(jails: Vec<JailState>) -> Answer {
        if jails.len() > MAX_LISTED {
            return Answer::Failed(Failure {
                op: "jail list".to_owned(),
                object: "the chroot base".to_owned(),
                errno: None,
                detail: format!(
                    "{} jails, over the {MAX_LISTED} one listing carries: remove stale jails by hand",
                    jails.len()
                ),
            });
        }
        Answer::Listed(jails)
    }
}

fn cut(mut s: String) -> String {
    if s.len() > MAX_TEXT_LEN {
        let mut end = MAX_TEXT_LEN;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

impl From<KernelError> for Failure {
    fn from(e: KernelError) -> Failure {
        match e {
            KernelError::Errno { op, object, errno } => Failure {
                op: op.to_owned(),
                object: cut(object),
                errno: Some(errno as i32),
                detail: String::new(),
            },
            KernelError::Other { op, object, detail } => {
                Failure { op: op.to_owned(), object: cut(object), errno: None, detail: cut(detail) }
            }
        }
    }
}

impl Failure {
    /// The failure as the helper reports it: `op` is the helper's name for the order, the
    /// launcher's own step goes with the object.
    pub fn into_kernel_error(self, op: &'static str) -> KernelError {
        let object = if self.op == op { self.object } else { format!("{} ({})", self.object, self.op) };
        match self.errno {
            Some(n) => KernelError::errno(op, object, Errno::from_raw(n)),
            None => KernelError::other(op, object, self.detail),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, OwnedFd};
    use std::os::unix::net::UnixStream;

    use banger_protocol::frame::{self, FrameError};
    use banger_protocol::{JailFiles, MAX_FDS_PER_FRAME, MAX_FRAME_LEN, VmShape, codec};
    use proptest::prelude::*;

    use super::*;
    use crate::kernel::UserLimits;

    fn launch() -> JailOrder {
        JailOrder {
            id: "bg-0123abcd".to_owned(),
            uid: 900_001,
            caller: 1000,
            shape: VmShape { vcpus: 2, mem_mib: 512 },
            user_cgroup: "banger/u1000".to_owned(),
            user_limits: UserLimits { vcpus: 8, mem_mib: 8192 },
            tap: Some("bgt0a1b2c3d".to_owned()),
            files: JailFiles { initrd: true, work: false },
        }
    }

    fn order() -> impl Strategy<Value = Order> {
        prop_oneof![
            (
                "[a-z0-9-]{1,64}",
                1u32..,
                1u32..,
                1u8..=32,
                128u32..(1 << 20),
                "[a-z0-9]{1,8}/u[0-9]{1,6}",
                any::<bool>(),
                any::<bool>()
            )
                .prop_map(|(id, uid, caller, vcpus, mem_mib, user_cgroup, initrd, work)| {
                    Order::Launch(JailOrder {
                        id,
                        uid,
                        caller,
                        shape: VmShape { vcpus, mem_mib },
                        user_cgroup,
                        user_limits: UserLimits { vcpus: 64, mem_mib: 1 << 20 },
                        tap: Some("bgtap0".to_owned()),
                        files: JailFiles { initrd, work },
                    })
                }),
            ("[a-z0-9-]{1,64}", 1u32.., prop::option::of(1i32..)).prop_map(|(id, uid, pid)| Order::Remove {
                id,
                uid,
                pid
            }),
            Just(Order::List),
        ]
    }

    fn answer() -> impl Strategy<Value = Answer> {
        prop_oneof![
            (1i32..).prop_map(Answer::Launched),
            Just(Answer::Removed),
            prop::collection::vec(
                ("[a-z0-9-]{1,64}", prop::option::of(1i32..), any::<bool>(), prop::option::of(any::<u32>())),
                0..40
            )
            .prop_map(|v| {
                Answer::Listed(
                    v.into_iter().map(|(id, pid, alive, uid)| JailState { id, pid, alive, uid }).collect(),
                )
            }),
            (".{0,40}", ".{0,40}", prop::option::of(1i32..200), ".{0,40}").prop_map(
                |(op, object, errno, detail)| Answer::Failed(Failure { op, object, errno, detail })
            ),
        ]
    }

    proptest! {
        #[test]
        fn orders_round_trip_and_check(o in order()) {
            let bytes = codec::encode(&o).unwrap();
            let back: Order = codec::decode(&bytes).unwrap();
            let fds = match &back { Order::Launch(l) => l.files.count(), _ => 0 };
            prop_assert_eq!(&back, &o);
            prop_assert_eq!(back.check(fds), Ok(()));
        }

        #[test]
        fn answers_round_trip_and_check(a in answer()) {
            let bytes = codec::encode(&a).unwrap();
            let back: Answer = codec::decode(&bytes).unwrap();
            prop_assert_eq!(&back, &a);
            prop_assert_eq!(back.check(), Ok(()));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = codec::decode::<Order>(&bytes);
            let _ = codec::decode::<Answer>(&bytes);
        }
    }

    #[test]
    fn orders_the_helper_never_makes_are_refused() {
        let with = |f: &dyn Fn(&mut JailOrder)| {
            let mut l = launch();
            f(&mut l);
            Order::Launch(l).check(2)
        };
        assert_eq!(Order::Launch(launch()).check(3), Ok(()));
        assert!(matches!(Order::Launch(launch()).check(2), Err(Malformed::Fds { got: 2, want: 3 })));
        assert!(matches!(with(&|l| l.id = "../../etc".into()), Err(Malformed::Id(_))));
        assert!(matches!(with(&|l| l.id = "A".into()), Err(Malformed::Id(_))));
        assert!(matches!(with(&|l| l.id = "a".repeat(65)), Err(Malformed::Id(_))));
        assert!(matches!(with(&|l| l.id = String::new()), Err(Malformed::Id(_))));
        assert!(matches!(with(&|l| l.user_cgroup = "../x".into()), Err(Malformed::Cgroup(_))));
        assert!(matches!(with(&|l| l.shape.vcpus = 0), Err(Malformed::Shape { .. })));
        assert!(matches!(with(&|l| l.shape.vcpus = MAX_VCPUS + 1), Err(Malformed::Shape { .. })));
        assert!(matches!(with(&|l| l.shape.mem_mib = MIN_MEM_MIB - 1), Err(Malformed::Shape { .. })));
        assert!(
            matches!(with(&|l| l.user_limits.vcpus = 1), Err(Malformed::Shape { .. })),
            "over the totals"
        );
        assert!(matches!(with(&|l| l.user_limits.mem_mib = 256), Err(Malformed::Shape { .. })));
        assert!(matches!(with(&|l| l.user_cgroup = "/banger/u1".into()), Err(Malformed::Cgroup(_))));
        assert!(matches!(with(&|l| l.user_cgroup = "banger//u1".into()), Err(Malformed::Cgroup(_))));
        assert!(matches!(with(&|l| l.tap = Some("a/b".into())), Err(Malformed::Tap(_))));
        assert!(matches!(with(&|l| l.tap = Some("x".repeat(16))), Err(Malformed::Tap(_))));
        assert!(matches!(with(&|l| l.uid = 0), Err(Malformed::Root(0))));
        assert!(matches!(with(&|l| l.caller = 0), Err(Malformed::Root(0))));
        let remove = |id: &str, uid, pid| Order::Remove { id: id.into(), uid, pid }.check(0);
        assert_eq!(remove("bg-1", 900_001, Some(7)), Ok(()));
        assert_eq!(remove("bg-1", 0, None), Ok(()), "a leftover directory of an unknown uid");
        assert!(matches!(remove("bg-1", 0, Some(7)), Err(Malformed::Root(0))));
        assert!(matches!(remove("bg-1", 5, Some(0)), Err(Malformed::Pid(0))));
        assert!(matches!(remove("bg-1", 5, Some(-1)), Err(Malformed::Pid(-1))));
        assert!(matches!(remove("x y", 5, None), Err(Malformed::Id(_))));
        assert!(matches!(Order::List.check(1), Err(Malformed::Fds { got: 1, want: 0 })));
    }

    #[test]
    fn answers_the_launcher_never_gives_are_refused() {
        assert!(matches!(Answer::Launched(0).check(), Err(Malformed::Pid(0))));
        let many = (0..=MAX_LISTED)
            .map(|i| JailState { id: format!("j{i}"), pid: None, alive: false, uid: None })
            .collect();
        assert!(matches!(Answer::Listed(many).check(), Err(Malformed::TooMany(_))));
        let bad = vec![JailState { id: "../x".into(), pid: None, alive: true, uid: None }];
        assert!(matches!(Answer::Listed(bad).check(), Err(Malformed::Id(_))));
    }

    #[test]
    fn the_longest_listing_fits_a_frame() {
        let jails: Vec<JailState> = (0..MAX_LISTED)
            .map(|i| JailState {
                id: format!("{i:0>64}"),
                pid: Some(i32::MAX),
                alive: true,
                uid: Some(u32::MAX),
            })
            .collect();
        let a = Answer::listed(jails);
        assert!(matches!(&a, Answer::Listed(v) if v.len() == MAX_LISTED));
        assert!(codec::encode(&a).unwrap().len() <= MAX_FRAME_LEN);
        let over: Vec<JailState> = (0..=MAX_LISTED)
            .map(|i| JailState { id: format!("j{i}"), pid: None, alive: false, uid: None })
            .collect();
        assert!(matches!(Answer::listed(over), Answer::Failed(f) if f.detail.contains("over the 512")));
    }

    #[test]
    fn failures_keep_their_errno_and_name_the_launcher_step() {
        let f = Failure::from(KernelError::errno("jailer", "bg-1", Errno::EEXIST));
        let e = f.into_kernel_error("jail launch");
        assert_eq!(e, KernelError::errno("jail launch", "bg-1 (jailer)", Errno::EEXIST));
        let f = Failure::from(KernelError::other("jail launch", "bg-1", "x".repeat(5000)));
        assert_eq!(f.detail.len(), MAX_TEXT_LEN);
        assert!(
            matches!(f.into_kernel_error("jail launch"), KernelError::Other { object, .. } if object == "bg-1")
        );
    }

    #[test]
    fn frames_bound_size_and_descriptors() {
        let (a, b) = UnixStream::pair().unwrap();
        let files: Vec<OwnedFd> =
            (0..=MAX_FDS_PER_FRAME).map(|_| std::fs::File::open("/dev/null").unwrap().into()).collect();
        let borrowed: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
        frame::send_blocking(a.as_fd(), &Order::List, &borrowed).unwrap();
        assert!(matches!(frame::recv_blocking::<Order>(b.as_fd()), Err(FrameError::TooManyFds)));
        let (a, b) = UnixStream::pair().unwrap();
        frame::write_frame_blocking(a.as_fd(), &[0xff, 0xff, 0xff], &[]).unwrap();
        assert!(matches!(frame::recv_blocking::<Order>(b.as_fd()), Err(FrameError::Codec(_))));
        let mut bytes = codec::encode(&Order::List).unwrap();
        bytes.push(0);
        assert!(codec::decode::<Order>(&bytes).is_err(), "trailing bytes");
    }
}
