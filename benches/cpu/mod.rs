//! CPU time that processes have used, for measures per event that the
//! host's noise moves less than rates.

use std::time::Duration;

/// CPU time (user and system) of one process.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuTime {
    /// Its own.
    pub own: Duration,
    /// Its children's that it has waited for.
    pub children: Duration,
}

/// The CPU time of process `pid`, from `/proc/PID/stat`; `None` where
/// there is no such file.
pub fn cpu_time(pid: u32) -> Option<CpuTime> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name (which may hold spaces and
    // parentheses), from the third, the state.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<u64>().ok();
    // Counted in USER_HZ, 100 per second in Linux's interface to user space.
    let time = |user, system| Some(Duration::from_millis((ticks(user)? + ticks(system)?) * 10));
    Some(CpuTime {
        own: time(11, 12)?,
        children: time(13, 14)?,
    })
}
