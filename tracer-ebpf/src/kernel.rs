//! Reading kernel memory: field offsets from the load-time constant, direct loads through
//! BTF-typed pointers, and helper reads for the rest.

use super::*;

/// The byte offset of a `SockOffsets` field, read straight from the load-time constant so that
/// the verifier knows its value.
macro_rules! offset {
    ($field:ident) => {{
        // SAFETY: a read-only global set at load time.
        #[allow(unused_unsafe)]
        let offset = unsafe { core::ptr::read_volatile(&OFFSETS.$field) } as usize;
        offset
    }};
}
pub(crate) use offset;

/// Loads a `T` at byte offset `offset` of the kernel object at `base` with one instruction.
///
/// # Safety
/// `base` must be a BTF-typed kernel pointer from the tracepoint's arguments and `offset` a
/// field of type `T` in it (the verifier rejects the program otherwise).
#[inline(always)]
pub(crate) unsafe fn field<T: Copy>(base: *const u8, offset: usize) -> T {
    core::ptr::read_volatile(base.add(offset) as *const T)
}

/// Reads a `T` at byte offset `offset` of the kernel object at `base`.
pub(crate) fn read<T>(base: *const u8, offset: usize) -> Result<T, i32> {
    // SAFETY: bpf_probe_read_kernel checks the address; a bad one returns an error.
    unsafe { bpf_probe_read_kernel(base.add(offset) as *const T) }
}

/// [`read`], or 0 when the read fails, which is reported as a failed read of `which`
/// (`tracer_common::field`).
#[inline(always)]
pub(crate) fn read_or_report<T: Default>(
    ctx: &impl EbpfContext,
    base: *const u8,
    offset: usize,
    which: u32,
) -> T {
    match read(base, offset) {
        Ok(value) => value,
        Err(_) => {
            report(ctx, counter::READ_FAILED, which);
            T::default()
        }
    }
}

/// Reads 16 bytes at byte offset `offset` of the kernel object at `base` straight into `dst`
/// (ring buffer memory); zeroes them and returns false if the read fails.
///
/// # Safety
/// `dst` must be 16 writable, 8-byte aligned bytes.
#[inline(always)]
pub(crate) unsafe fn read_into(dst: *mut [u8; 16], base: *const u8, offset: usize) -> bool {
    let src = base.add(offset) as *const c_void;
    if gen::bpf_probe_read_kernel(dst as *mut c_void, 16, src) != 0 {
        zero16(dst);
        return false;
    }
    true
}

/// Zeroes 16 bytes with two stores (an array write would become a byte-wise memset call).
///
/// # Safety
/// `dst` must be 16 writable, 8-byte aligned bytes.
#[inline(always)]
pub(crate) unsafe fn zero16(dst: *mut [u8; 16]) {
    let p = dst as *mut u64;
    p.write_volatile(0);
    p.add(1).write_volatile(0);
}
