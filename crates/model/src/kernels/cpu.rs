//! What this CPU runs, detected once for every kernel module ([`crate::kernels::bf16`],
//! [`crate::kernels::kquant`], the attention kernels), and which kernel sets `KOLLAVA_KERNELS` asks
//! for (`avx2`, `avx512`: a slower set on a CPU with faster ones, to measure or test it).

use std::sync::OnceLock;

/// The instruction sets the kernels choose between (all false off x86-64).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cpu {
    /// AVX2 with FMA: every 256-bit kernel.
    pub avx2_fma: bool,
    pub avx512f: bool,
    pub avx512bw: bool,
    pub avx512vl: bool,
    pub avx512vnni: bool,
    pub avx512bf16: bool,
    /// AMX-BF16 tiles, and the OS lets this process use them.
    pub amx: bool,
    /// `KOLLAVA_KERNELS`.
    pub request: Request,
}

/// A kernel set asked for through `KOLLAVA_KERNELS`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Request {
    /// The fastest this CPU runs.
    #[default]
    Fastest,
    /// `avx2`: the 256-bit kernels even where 512-bit ones run.
    Avx2,
    /// `avx512`: the 512-bit kernels even where AMX runs.
    Avx512,
}

/// This CPU, detected on first use.
pub fn cpu() -> &'static Cpu {
    static CPU: OnceLock<Cpu> = OnceLock::new();
    CPU.get_or_init(|| {
        let request = match std::env::var("KOLLAVA_KERNELS") {
            Ok(v) if v.eq_ignore_ascii_case("avx2") => Request::Avx2,
            Ok(v) if v.eq_ignore_ascii_case("avx512") => Request::Avx512,
            _ => Request::Fastest,
        };
        detect(request)
    })
}

#[cfg(target_arch = "x86_64")]
fn detect(request: Request) -> Cpu {
    use std::arch::is_x86_feature_detected as has;
    let avx512f = has!("avx512f");
    Cpu {
        avx2_fma: has!("avx2") && has!("fma"),
        avx512f,
        avx512bw: avx512f && has!("avx512bw"),
        avx512vl: avx512f && has!("avx512vl"),
        avx512vnni: avx512f && has!("avx512vnni"),
        avx512bf16: avx512f && has!("avx512bf16"),
        amx: amx_usable(),
        request,
    }
}

/// Whether this CPU has AMX-BF16 and the kernel lets this process use the tile registers
/// (Linux hands them out on request, once per process).
#[cfg(target_arch = "x86_64")]
fn amx_usable() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        // CPUID leaf 7: EDX bit 22 is AMX-BF16, bit 24 AMX-TILE (std's detection of them is
        // unstable). Linux grants the request below only where the OS supports them too.
        let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
        if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 {
            return false;
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: arch_prctl with these arguments only changes which register state the
        // kernel saves for this process.
        unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            ) == 0
        }
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        false
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect(request: Request) -> Cpu {
    Cpu {
        request,
        ..Cpu::default()
    }
}

impl Cpu {
    /// Whether the 512-bit kernels may run: the CPU has AVX512F and `KOLLAVA_KERNELS` does
    /// not ask for the 256-bit ones.
    pub fn wide(&self) -> bool {
        self.avx512f && self.request != Request::Avx2
    }
}
