//! Whether the host takes this node's free memory back (virtio-balloon free page
//! reporting, on some virtual machines), and what executors do about it.
//!
//! There, memory freed and left a few seconds goes back to the host, and a fresh huge page
//! taken from it costs a host fault for each of its 4 KiB pages. numpy asks for huge pages
//! for every array of 4 MiB or more: on the test VM a new 256 MiB array filled at
//! 0.19-0.37 GB/s that way against 2.75 GB/s on 4 KiB pages (and 15-17 GB/s on huge pages
//! the process had just freed). Executors keep their freed heap, so what they reuse is
//! unaffected; what they grow into is, and a rechunk's first merge of a 94.6 MB cube took
//! 415-500 ms on huge pages against 62-70 ms on 4 KiB ones (docs/performance.md). Bare
//! metal has no such cost: there numpy's default stays, and malloc is asked for huge pages
//! too ([`crate::heap::executor_heap_tunables`]). Here that made the 4x rechunk 9% faster
//! once the heap had grown, but its first run 47% slower, and under a memory limit (big
//! arrays mapped afresh each time) no faster at all.

use crate::heap::{executor_heap_tunables, GLIBC_TUNABLES_VAR};
use std::path::Path;

/// numpy's switch for its huge-page advice (read when numpy is imported).
pub const NUMPY_HUGE_PAGES_VAR: &str = "NUMPY_MADVISE_HUGEPAGE";

/// The virtio device id of a memory balloon.
const BALLOON_DEVICE: &str = "0x0005";

/// The balloon's feature bit for free page reporting (`VIRTIO_BALLOON_F_REPORTING`).
const REPORTING_FEATURE: usize = 5;

/// Whether a virtio balloon of this node reports free pages to the host.
pub fn active() -> bool {
    active_under(Path::new("/sys/bus/virtio/devices"))
}

fn active_under(devices: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(devices) else {
        return false;
    };
    entries.flatten().any(|entry| {
        let read = |name| std::fs::read_to_string(entry.path().join(name)).unwrap_or_default();
        reports_free_pages(&read("device"), &read("features"))
    })
}

/// Whether a virtio device (`device`: its id, `features`: its negotiated feature bits as
/// sysfs lists them, bit 0 first) is a balloon that reports free pages.
fn reports_free_pages(device: &str, features: &str) -> bool {
    device.trim() == BALLOON_DEVICE
        && features.trim().as_bytes().get(REPORTING_FEATURE) == Some(&b'1')
}

/// The variable executors get about huge pages, given the value each variable would have
/// otherwise (`given`). Where the host takes free memory back (`reporting`): numpy's
/// advice off, unless the user set it. Elsewhere: malloc's heap on huge pages, added to
/// their `GLIBC_TUNABLES`.
pub fn executor_env(
    reporting: bool,
    given: impl Fn(&str) -> Option<String>,
) -> Option<(String, String)> {
    if reporting {
        (given(NUMPY_HUGE_PAGES_VAR).is_none())
            .then(|| (NUMPY_HUGE_PAGES_VAR.to_string(), "0".to_string()))
    } else {
        executor_heap_tunables(given(GLIBC_TUNABLES_VAR).as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_balloon_that_reports_free_pages_is_told_apart() {
        // This project's VM: a balloon with bits 1, 2 and 5 (reporting) negotiated.
        let reporting = "0110010100000000000000000000000010000000";
        assert!(reports_free_pages("0x0005\n", &format!("{reporting}\n")));
        assert!(
            !reports_free_pages("0x0005", "0110000100000000"),
            "bit 5 off"
        );
        assert!(!reports_free_pages("0x0001", reporting), "a network device");
        assert!(!reports_free_pages("0x0005", "0110"), "too short");
        assert!(!reports_free_pages("", ""));
    }

    #[test]
    fn the_devices_folder_is_read_and_a_missing_one_means_no() {
        let sys = tempfile::tempdir().unwrap();
        assert!(!active_under(&sys.path().join("absent")));
        let device = |name: &str, id: &str, features: &str| {
            let dir = sys.path().join(name);
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(dir.join("device"), id).unwrap();
            std::fs::write(dir.join("features"), features).unwrap();
        };
        device("virtio0", "0x0001", "0000011");
        assert!(!active_under(sys.path()));
        device("virtio1", "0x0005", "0110010");
        assert!(active_under(sys.path()));
    }

    #[test]
    fn numpy_is_told_off_where_the_host_takes_memory_back_and_malloc_on_elsewhere() {
        let none = |_: &str| None;
        let only = |var: &'static str, value: &'static str| {
            move |asked: &str| (asked == var).then(|| value.to_string())
        };
        let off = Some((NUMPY_HUGE_PAGES_VAR.to_string(), "0".to_string()));
        assert_eq!(executor_env(true, none), off);
        assert_eq!(executor_env(true, only(NUMPY_HUGE_PAGES_VAR, "1")), None);
        assert_eq!(
            executor_env(true, only("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")),
            off,
            "a user's tunables pass on as they are"
        );
        let heap = |value: &str| Some(("GLIBC_TUNABLES".to_string(), value.to_string()));
        assert_eq!(executor_env(false, none), heap("glibc.malloc.hugetlb=1"));
        assert_eq!(
            executor_env(false, only("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")),
            None
        );
        assert_eq!(
            executor_env(false, only(NUMPY_HUGE_PAGES_VAR, "1")),
            heap("glibc.malloc.hugetlb=1"),
            "numpy's advice is the user's own elsewhere"
        );
    }
}
