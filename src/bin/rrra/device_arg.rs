//! `--device cpu|cuda|cuda:N`, the one device option of every command, and the checks of the
//! options that only mean something on a GPU (`--precision`, `--gpu-math`).

use rrra::device::encoder::Precision;
use rrra::device::GemmMath;
use rrra::{Error, Result};
use std::fmt;
use std::str::FromStr;

/// Where a command computes: the CPU, or a CUDA device by ordinal (`cuda` is `cuda:0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    Cuda(usize),
}

impl Device {
    /// The CUDA device ordinal; `None` on the CPU.
    pub fn cuda_ordinal(self) -> Option<usize> {
        match self {
            Device::Cpu => None,
            Device::Cuda(n) => Some(n),
        }
    }
}

impl FromStr for Device {
    type Err = Error;
    fn from_str(s: &str) -> Result<Device> {
        let ordinal = match s.strip_prefix("cuda:") {
            // digits only: `usize::from_str` would also take a leading `+`
            Some(n) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => n.parse().ok(),
            _ => None,
        };
        match (s, ordinal) {
            ("cpu", _) => Ok(Device::Cpu),
            ("cuda", _) => Ok(Device::Cuda(0)),
            (_, Some(n)) => Ok(Device::Cuda(n)),
            _ => Err(Error::InvalidArgument(format!(
                "{s:?}: expected cpu, cuda or cuda:N"
            ))),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// `--precision`: the GPU encoder's arithmetic, bf16 (tensor cores) or f32.
pub fn parse_precision(s: &str) -> Result<Precision> {
    match s {
        "bf16" => Ok(Precision::Bf16),
        "f32" => Ok(Precision::F32),
        _ => Err(Error::InvalidArgument(format!(
            "{s:?}: expected bf16 or f32"
        ))),
    }
}

/// The CUDA ordinal and the encoder's arithmetic (`--precision`, bf16 unless given) of
/// `device`, or `None` on the CPU. The CPU encodes in f32 only, so `--precision` with
/// `--device cpu` is refused rather than ignored.
pub fn cuda_precision(
    device: Device,
    precision: Option<Precision>,
) -> Result<Option<(usize, Precision)>> {
    match (device, precision) {
        (Device::Cuda(n), p) => Ok(Some((n, p.unwrap_or(Precision::Bf16)))),
        (Device::Cpu, None) => Ok(None),
        (Device::Cpu, Some(p)) => Err(Error::InvalidArgument(format!(
            "--precision {p} sets the GPU encoder's arithmetic; with --device cpu the encoder \
             runs in f32: drop --precision or pass --device cuda[:N]"
        ))),
    }
}

/// Refuses `--gpu-math` other than f32 with `--device cpu`, whose products are always f32.
pub fn check_gpu_math(device: Device, math: GemmMath) -> Result<()> {
    if device == Device::Cpu && math != GemmMath::F32 {
        return Err(Error::InvalidArgument(format!(
            "--gpu-math {math} applies to a GPU's products; with --device cpu they are f32: \
             drop --gpu-math or pass --device cuda[:N]"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_accepted_forms() {
        assert_eq!("cpu".parse::<Device>().ok(), Some(Device::Cpu));
        assert_eq!("cuda".parse::<Device>().ok(), Some(Device::Cuda(0)));
        assert_eq!("cuda:0".parse::<Device>().ok(), Some(Device::Cuda(0)));
        assert_eq!("cuda:3".parse::<Device>().ok(), Some(Device::Cuda(3)));
        assert_eq!("cuda:12".parse::<Device>().ok(), Some(Device::Cuda(12)));
    }

    #[test]
    fn refuses_everything_else_saying_what_is_accepted() {
        for bad in [
            "",
            "gpu0",
            "gpu",
            "0",
            "CPU",
            "Cuda",
            "cuda:",
            "cuda:x",
            "cuda:-1",
            "cuda:+1",
            "cuda:1:2",
            " cuda",
            "cuda ",
            "cuda0",
            "cpu:0",
            "cuda:99999999999999999999999",
        ] {
            let err = bad.parse::<Device>().map(|d| d.to_string());
            let Err(e) = err else {
                panic!("{bad:?} accepted as {err:?}");
            };
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("{bad:?}")) && msg.contains("expected cpu, cuda or cuda:N"),
                "{bad:?}: {msg}"
            );
        }
    }

    #[test]
    fn display_round_trips() {
        for d in [Device::Cpu, Device::Cuda(0), Device::Cuda(7)] {
            assert_eq!(d.to_string().parse::<Device>().ok(), Some(d));
        }
        assert_eq!(Device::Cuda(0).to_string(), "cuda:0");
        assert_eq!(Device::default(), Device::Cpu);
        assert_eq!(Device::Cpu.cuda_ordinal(), None);
        assert_eq!(Device::Cuda(2).cuda_ordinal(), Some(2));
    }

    #[test]
    fn gpu_only_options_are_refused_on_the_cpu() {
        assert!(matches!(cuda_precision(Device::Cpu, None), Ok(None)));
        assert_eq!(
            cuda_precision(Device::Cuda(1), None).ok(),
            Some(Some((1, Precision::Bf16)))
        );
        assert_eq!(
            cuda_precision(Device::Cuda(0), Some(Precision::F32)).ok(),
            Some(Some((0, Precision::F32)))
        );
        let e = cuda_precision(Device::Cpu, Some(Precision::F32));
        assert!(matches!(e, Err(Error::InvalidArgument(m)) if m.contains("--precision f32")));
        assert!(parse_precision("fp16").is_err());
        assert!(check_gpu_math(Device::Cpu, GemmMath::F32).is_ok());
        assert!(check_gpu_math(Device::Cuda(0), GemmMath::Bf16).is_ok());
        let e = check_gpu_math(Device::Cpu, GemmMath::Tf32);
        assert!(matches!(e, Err(Error::InvalidArgument(m)) if m.contains("--gpu-math tf32")));
    }
}
