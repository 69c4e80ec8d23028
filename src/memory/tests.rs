use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use super::*;

/// A sockstat as Linux 6.x writes it.
const SOCKSTAT: &str = "sockets: used 40
TCP: inuse 20 orphan 3 tw 13411 alloc 20 mem 976
UDP: inuse 0 mem 0
UDPLITE: inuse 0
RAW: inuse 0
FRAG: inuse 0 memory 0
";

/// A hybrid host: v1 controllers, the unified hierarchy beside them.
const HYBRID: &str = "9:name=systemd:/
8:pids:/
4:memory:/process_api/4c00
3:cpu,cpuacct:/
0::/
";

/// A pure v2 host, or a container in its own cgroup namespace.
const V2: &str = "0::/kubepods.slice/pod1/ctr\n";

#[test]
fn sockstat_gives_tcp_memory_and_orphans() {
    assert_eq!(parse_sockstat(SOCKSTAT), Some((Some(976), Some(3))));
    // An older kernel without the orphan field, a mangled mem: each part on its own.
    assert_eq!(
        parse_sockstat("TCP: inuse 1 mem 12\n"),
        Some((Some(12), None))
    );
    assert_eq!(
        parse_sockstat("TCP: inuse 1 orphan 2 mem x\n"),
        Some((None, Some(2)))
    );
    assert_eq!(parse_sockstat("TCP: inuse 1 orphan\n"), Some((None, None)));
    assert_eq!(parse_sockstat("UDP: inuse 0 mem 4\n"), None, "no TCP line");
    assert_eq!(parse_sockstat(""), None);
}

#[test]
fn tcp_mem_is_three_numbers() {
    assert_eq!(
        parse_tcp_mem("288471\t384629\t576942\n"),
        Some([288471, 384629, 576942])
    );
    assert_eq!(parse_tcp_mem("1 2\n"), None);
    assert_eq!(parse_tcp_mem("1 2 3 4\n"), None);
    assert_eq!(parse_tcp_mem("1 two 3\n"), None);
    assert_eq!(parse_tcp_mem(""), None);
}

#[test]
fn proc_cgroup_prefers_the_v1_memory_controller() {
    assert_eq!(
        parse_proc_cgroup(HYBRID),
        Some(Membership::V1("/process_api/4c00".into()))
    );
    assert_eq!(
        parse_proc_cgroup("5:cpuset,memory:/a\n"),
        Some(Membership::V1("/a".into())),
        "a memory controller co-mounted with others"
    );
    assert_eq!(
        parse_proc_cgroup(V2),
        Some(Membership::V2("/kubepods.slice/pod1/ctr".into()))
    );
    assert_eq!(parse_proc_cgroup("8:pids:/\n"), None, "no memory at all");
    assert_eq!(parse_proc_cgroup("garbage\n\n0:/\n"), None);
}

#[test]
fn limits_know_no_limit() {
    assert_eq!(parse_limit("max\n"), Some(None));
    assert_eq!(
        parse_limit("9223372036854771712\n"),
        Some(None),
        "v1, 4 KiB pages"
    );
    assert_eq!(
        parse_limit("9223372036854710272\n"),
        Some(None),
        "v1, 64 KiB pages"
    );
    assert_eq!(parse_limit("268435456\n"), Some(Some(268435456)));
    assert_eq!(parse_limit("-1"), None);
    assert_eq!(parse_limit(""), None);
}

#[test]
fn stat_values_by_exact_key() {
    let stat = "cache 10\ninactive_file 7\ntotal_inactive_file 9\nsock 4096\n";
    assert_eq!(stat_value(stat, "inactive_file"), Some(7));
    assert_eq!(stat_value(stat, "total_inactive_file"), Some(9));
    assert_eq!(stat_value(stat, "sock"), Some(4096));
    assert_eq!(stat_value(stat, "file"), None);
}

/// A directory of fake `/proc` and `/sys` files, removed when dropped.
struct Root(PathBuf);

impl Root {
    fn new() -> Root {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "halfguard-memory-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Root(dir)
    }

    fn put(&self, rel: &str, text: &str) -> &Root {
        let p = self.0.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
        self
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn nothing_to_read_is_nothing_known() {
    let r = Root::new();
    let s = MemorySource::at(r.path()).read();
    assert_eq!(
        (
            s.tcp_pages,
            s.tcp_mem,
            s.orphans,
            s.cgroup,
            s.sockets,
            s.tcp_cgroup
        ),
        (None, None, None, None, None, None)
    );
    assert!(!s.under_pressure(&PressureConfig::default(), false));
    assert!(!s.under_pressure(&PressureConfig::default(), true));
}

#[test]
fn v2_takes_the_tightest_limit_on_the_way_to_the_root_less_inactive_files() {
    let r = Root::new();
    let leaf = "sys/fs/cgroup/kubepods.slice/pod1/ctr";
    let pod = "sys/fs/cgroup/kubepods.slice/pod1";
    r.put("proc/self/cgroup", V2)
        .put("proc/net/sockstat", SOCKSTAT)
        .put("proc/sys/net/ipv4/tcp_mem", "100 200 300\n")
        .put(&format!("{leaf}/memory.max"), "max\n")
        .put(&format!("{leaf}/memory.current"), "1000\n")
        .put(&format!("{leaf}/memory.stat"), "anon 800\nsock 4096\n")
        // The pod's limit binds: 900 of 1000 used, 100 of them reclaimable cache.
        .put(&format!("{pod}/memory.max"), "1000\n")
        .put(&format!("{pod}/memory.current"), "900\n")
        .put(&format!("{pod}/memory.stat"), "inactive_file 100\n")
        // A looser limit higher up loses.
        .put("sys/fs/cgroup/kubepods.slice/memory.max", "100000\n")
        .put("sys/fs/cgroup/kubepods.slice/memory.current", "50000\n");
    let s = MemorySource::at(r.path()).read();
    assert_eq!(s.tcp_pages, Some(976));
    assert_eq!(s.orphans, Some(3));
    assert_eq!(s.tcp_mem, Some([100, 200, 300]));
    assert_eq!(s.cgroup, Some((800, 1000)));
    assert_eq!(s.sockets, Some(4096));
    assert_eq!(s.tcp_cgroup, None, "v2 has no separate TCP limit");
    assert_eq!(s.tcp_bytes(), Some(976 * s.page_size));
}

#[test]
fn v1_reads_the_memory_hierarchy_and_its_tcp_limit() {
    let r = Root::new();
    let dir = "sys/fs/cgroup/memory/process_api/4c00";
    r.put("proc/self/cgroup", HYBRID)
        .put(&format!("{dir}/memory.limit_in_bytes"), "268435456\n")
        .put(&format!("{dir}/memory.usage_in_bytes"), "134217728\n")
        .put(
            &format!("{dir}/memory.stat"),
            "inactive_file 1\ntotal_inactive_file 4096\n",
        )
        .put(&format!("{dir}/memory.kmem.tcp.limit_in_bytes"), "65536\n")
        .put(&format!("{dir}/memory.kmem.tcp.usage_in_bytes"), "61440\n")
        // The host's root: no limit.
        .put(
            "sys/fs/cgroup/memory/memory.limit_in_bytes",
            "9223372036854771712\n",
        )
        .put("sys/fs/cgroup/memory/memory.usage_in_bytes", "999999999\n")
        // The v2 hierarchy beside it is not where memory is controlled.
        .put("sys/fs/cgroup/memory.max", "1\n")
        .put("sys/fs/cgroup/memory.current", "1\n");
    let s = MemorySource::at(r.path()).read();
    assert_eq!(s.cgroup, Some((134217728 - 4096, 268435456)));
    assert_eq!(s.tcp_cgroup, Some((61440, 65536)));
    assert_eq!(s.sockets, None);
    let cfg = PressureConfig::default();
    assert_eq!(
        s.cause(&cfg, false),
        Some(Cause::CgroupTcp),
        "TCP memory at 94% of its own limit, the cgroup at half"
    );
}

#[test]
fn unlimited_v1_and_garbage_are_no_limit() {
    let r = Root::new();
    let dir = "sys/fs/cgroup/memory/x";
    r.put("proc/self/cgroup", "4:memory:/x\n")
        .put(
            &format!("{dir}/memory.limit_in_bytes"),
            "9223372036854771712\n",
        )
        .put(&format!("{dir}/memory.usage_in_bytes"), "100\n")
        .put(&format!("{dir}/memory.kmem.tcp.limit_in_bytes"), "lots\n")
        .put(&format!("{dir}/memory.kmem.tcp.usage_in_bytes"), "100\n")
        .put("proc/net/sockstat", "TCP: inuse x\n")
        .put("proc/sys/net/ipv4/tcp_mem", "\n");
    let s = MemorySource::at(r.path()).read();
    assert_eq!((s.cgroup, s.tcp_cgroup), (None, None));
    assert_eq!((s.tcp_pages, s.orphans, s.tcp_mem), (None, None, None));
}

fn state(tcp_pages: u64, cgroup: Option<(u64, u64)>) -> MemoryState {
    MemoryState {
        tcp_pages: Some(tcp_pages),
        tcp_mem: Some([750, 1000, 1500]),
        page_size: 4096,
        cgroup,
        ..MemoryState::default()
    }
}

#[test]
fn pressure_turns_on_above_the_high_marks_and_off_at_the_low_ones() {
    let cfg = PressureConfig::default();
    // tcp_mem_high 0.9 of the pressure value (1000 pages), tcp_mem_low 0.75.
    assert!(
        !state(900, None).under_pressure(&cfg, false),
        "900 is not above 900"
    );
    assert_eq!(state(901, None).cause(&cfg, false), Some(Cause::TcpMem));
    assert!(state(800, None).under_pressure(&cfg, true), "hysteresis");
    assert!(!state(750, None).under_pressure(&cfg, true));
    // memory_high 0.8 of the cgroup limit, memory_low 0.7.
    let c = |used| state(0, Some((used, 1000)));
    assert!(!c(800).under_pressure(&cfg, false));
    assert_eq!(c(801).cause(&cfg, false), Some(Cause::Cgroup));
    assert!(c(701).under_pressure(&cfg, true));
    assert!(!c(700).under_pressure(&cfg, true));
}
