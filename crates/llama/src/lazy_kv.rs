//! Lazy KV memory. llama.cpp zero-fills its KV buffer when it creates a context (so that
//! padding cells never hold NaNs), and that write makes every page of the buffer resident
//! before a single request: 2.9 GB for llama-server's per-sequence layout at 131,072
//! cells. The zeros carry no information, so right after the context is created this
//! module hands those pages back to the kernel (`madvise(MADV_DONTNEED)`). The mapping
//! stays; a page comes back, zero-filled by the kernel exactly as before, when a sequence
//! first writes a cell in it. Resident memory then follows the cells in use, in any
//! layout.
//!
//! Finding the buffer. llama.cpp's C API does not expose it, and ggml's CPU buffers come
//! from `posix_memalign`. This module defines `posix_memalign` (forwarding to glibc's
//! `memalign`, with glibc's own argument checks), so the linker resolves ggml's calls
//! here. While a thread runs [`created_lazily`], the hook records that thread's large
//! allocations; the first of exactly the KV buffer's computed size is the buffer.
//! llama.cpp allocates it while creating the context and keeps it for the context's life,
//! so the record names live memory that no other thread has seen yet. Before releasing, every page is
//! checked to read zero; any other content leaves the whole buffer resident.

use std::cell::Cell;
use std::ffi::{c_int, c_void};

/// Allocations the hook records, on the thread inside [`created_lazily`] only.
const SEEN: usize = 8;
/// Smaller allocations are not recorded.
const MIN_RECORDED: usize = 1 << 20;

/// What the hook has recorded on the current thread: the first [`SEEN`] allocations of
/// at least [`MIN_RECORDED`] bytes, as (address, size).
#[derive(Clone, Copy)]
struct Capture {
    on: bool,
    n: usize,
    seen: [(usize, usize); SEEN],
}

const IDLE: Capture = Capture {
    on: false,
    n: 0,
    seen: [(0, 0); SEEN],
};

thread_local! {
    // Const-initialised and without a destructor: using it never allocates, which
    // matters inside an allocation function.
    static CAPTURE: Cell<Capture> = const { Cell::new(IDLE) };
}

/// `posix_memalign` for the whole process: glibc's checks, then glibc's `memalign`, then
/// the capture check (one thread-local read when not capturing).
///
/// # Safety
/// The C contract of `posix_memalign`: `out` is valid for a pointer write.
#[no_mangle]
pub unsafe extern "C" fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> c_int {
    // A power-of-two multiple of the pointer size (itself a power of two).
    if !align.is_power_of_two() || align < std::mem::size_of::<*mut c_void>() {
        return libc::EINVAL;
    }
    // SAFETY: memalign accepts any power-of-two alignment and any size.
    let p = unsafe { libc::memalign(align, size) };
    if p.is_null() {
        return libc::ENOMEM;
    }
    // SAFETY: the caller guarantees `out` is writable.
    unsafe { *out = p };
    if size >= MIN_RECORDED {
        let _ = CAPTURE.try_with(|c| {
            let mut cap = c.get();
            if cap.on && cap.n < SEEN {
                cap.seen[cap.n] = (p as usize, size);
                cap.n += 1;
                c.set(cap);
            }
        });
    }
    0
}

/// What [`created_lazily`] did with the KV buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvPages {
    /// Released this many bytes of zero pages.
    Released(usize),
    /// No allocation of the expected size was seen (another model shape or KV type, or
    /// another allocator): the buffer stays resident.
    NotFound,
    /// The buffer held something other than zeros: left resident.
    NotZero,
    /// `madvise` refused (this errno): left resident.
    Refused(i32),
}

/// Run `create`, which creates a llama.cpp context, on this thread; then release the
/// zero pages of its KV buffer, whose size in bytes `kv_bytes` computes from the created
/// context. Must be called before the context runs anything.
pub fn created_lazily<T>(
    create: impl FnOnce() -> T,
    kv_bytes: impl FnOnce(&T) -> usize,
) -> (T, KvPages) {
    CAPTURE.with(|c| c.set(Capture { on: true, ..IDLE }));
    let out = create();
    let cap = CAPTURE.with(|c| c.replace(IDLE));
    let want = kv_bytes(&out);
    // The first allocation of exactly the KV size: llama.cpp makes the KV buffer before
    // its compute buffers (which it may free and regrow while creating the context) and
    // keeps it for the context's life.
    let Some(&(start, len)) = cap.seen[..cap.n].iter().find(|(_, len)| *len == want) else {
        return (out, KvPages::NotFound);
    };
    // SAFETY: `start` is a live `len`-byte allocation made by this thread inside
    // `create` (see above), which no other thread has been handed yet.
    let pages = unsafe { release_zero_pages(start as *mut u8, len) };
    (out, pages)
}

/// Release the whole pages inside `[start, start + len)` if every byte of the range is
/// zero.
///
/// # Safety
/// The range is one live allocation that no other thread reads or writes meanwhile.
unsafe fn release_zero_pages(start: *mut u8, len: usize) -> KvPages {
    // SAFETY: the caller guarantees the range is live and unshared.
    let bytes = unsafe { std::slice::from_raw_parts(start as *const u8, len) };
    let (head, words, tail) = unsafe { bytes.align_to::<u64>() };
    // OR-folded a page's worth at a time, which vectorises; `any` stops per word and
    // does not.
    let nonzero = |ws: &[u64]| ws.iter().fold(0, |acc, &w| acc | w) != 0;
    if head.iter().chain(tail).any(|&b| b != 0) || words.chunks(512).any(nonzero) {
        return KvPages::NotZero;
    }
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let first = (start as usize).div_ceil(page) * page;
    let end = (start as usize + len) / page * page;
    if end <= first {
        return KvPages::Released(0);
    }
    // SAFETY: whole pages inside a private anonymous allocation that reads zero: after
    // MADV_DONTNEED they read zero again, so the allocation's contents do not change.
    let rc = unsafe { libc::madvise(first as *mut c_void, end - first, libc::MADV_DONTNEED) };
    if rc == 0 {
        KvPages::Released(end - first)
    } else {
        KvPages::Refused(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn aligned(size: usize) -> *mut c_void {
        let mut p = std::ptr::null_mut();
        // SAFETY: `p` is a valid out pointer.
        assert_eq!(unsafe { posix_memalign(&mut p, 64, size) }, 0);
        p
    }

    /// A fresh allocation written with zeros, as llama.cpp clears its KV buffer.
    fn zeroed(len: usize) -> *mut u8 {
        let p = aligned(len) as *mut u8;
        // SAFETY: `p` is a fresh `len`-byte allocation.
        unsafe { std::ptr::write_bytes(p, 0, len) };
        p
    }

    /// Resident pages of the whole pages inside `[p, p + len)`.
    fn resident_pages(p: *mut u8, len: usize) -> usize {
        let first = (p as usize).div_ceil(4096) * 4096;
        let end = (p as usize + len) / 4096 * 4096;
        let mut v = vec![0u8; (end - first) / 4096];
        // SAFETY: the range lies inside a live mapping; `v` has one byte per page.
        assert_eq!(
            unsafe { libc::mincore(first as *mut c_void, end - first, v.as_mut_ptr()) },
            0
        );
        v.iter().filter(|b| *b & 1 == 1).count()
    }

    #[test]
    fn the_hook_checks_alignment_like_glibc() {
        let mut p = std::ptr::null_mut();
        for bad in [0, 3, 12, 24] {
            // SAFETY: `p` is a valid out pointer.
            assert_eq!(unsafe { posix_memalign(&mut p, bad, 16) }, libc::EINVAL);
        }
        let p = aligned(100);
        assert_eq!(p as usize % 64, 0);
        // SAFETY: allocated by memalign above.
        unsafe { libc::free(p) };
    }

    #[test]
    fn a_zeroed_buffer_made_inside_the_window_leaves_memory_and_still_reads_zero() {
        let len = 8 << 20;
        let (p, pages) = created_lazily(
            || {
                // An earlier allocation of another size, freed: not the one looked for.
                let small = zeroed(len / 4);
                let p = zeroed(len);
                // SAFETY: allocated by memalign.
                unsafe { libc::free(small as *mut c_void) };
                p
            },
            |_| len,
        );
        match pages {
            KvPages::Released(n) => assert!(n >= len - 2 * 4096, "released {n} of {len}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(resident_pages(p, len), 0);
        // SAFETY: still a live allocation of `len` bytes.
        let bytes = unsafe { std::slice::from_raw_parts_mut(p, len) };
        assert!(bytes.iter().all(|&b| b == 0));
        bytes[len / 2] = 7;
        assert_eq!(bytes[len / 2], 7);
        // SAFETY: allocated by memalign.
        unsafe { libc::free(p as *mut c_void) };
    }

    #[test]
    fn a_buffer_with_content_or_of_another_size_is_left_alone() {
        let len = 4 << 20;
        let (p, pages) = created_lazily(
            || {
                let p = zeroed(len);
                // SAFETY: inside the allocation.
                unsafe { *p.add(len - 1) = 1 };
                p
            },
            |_| len,
        );
        assert_eq!(pages, KvPages::NotZero);
        assert!(resident_pages(p, len) * 4096 >= len - 2 * 4096);
        // SAFETY: still live; allocated by memalign.
        assert_eq!(unsafe { *p.add(len - 1) }, 1);
        unsafe { libc::free(p as *mut c_void) };
        let (q, pages) = created_lazily(|| zeroed(len + 64), |_| len);
        assert_eq!(pages, KvPages::NotFound);
        // SAFETY: allocated by memalign.
        unsafe { libc::free(q as *mut c_void) };
    }
}
