//! Walltimes as SLURM writes them: `MM`, `MM:SS`, `HH:MM:SS`, `D-HH`, `D-HH:MM`,
//! `D-HH:MM:SS`. Rendered as `HH:MM:SS`, which both SLURM and PBS accept.

use std::fmt;
use std::time::Duration;

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Walltime(Duration);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "malformed walltime '{0}': expected minutes, MM:SS, HH:MM:SS or D-HH[:MM[:SS]] \
     (e.g. 90, 01:30:00, 2-00:00:00), more than zero"
)]
pub struct WalltimeError(String);

impl Walltime {
    pub fn from_secs(seconds: u64) -> Walltime {
        Walltime(Duration::from_secs(seconds))
    }

    pub fn as_secs(self) -> u64 {
        self.0.as_secs()
    }
}

impl std::str::FromStr for Walltime {
    type Err = WalltimeError;

    fn from_str(text: &str) -> Result<Walltime, WalltimeError> {
        let error = || WalltimeError(text.to_owned());
        let number = |part: &str| -> Result<u64, WalltimeError> {
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(error());
            }
            part.parse().map_err(|_| error())
        };
        let (days, clock) = match text.split_once('-') {
            Some((days, clock)) => (Some(number(days)?), clock),
            None => (None, text),
        };
        let parts = clock
            .split(':')
            .map(number)
            .collect::<Result<Vec<_>, _>>()?;
        let seconds = match (days, parts.as_slice()) {
            (None, [minutes]) => minutes * 60,
            (None, [minutes, seconds]) if *seconds < 60 => minutes * 60 + seconds,
            (None, [hours, minutes, seconds]) if *minutes < 60 && *seconds < 60 => {
                hours * 3600 + minutes * 60 + seconds
            }
            (Some(days), [hours]) => days * 86400 + hours * 3600,
            (Some(days), [hours, minutes]) if *minutes < 60 => {
                days * 86400 + hours * 3600 + minutes * 60
            }
            (Some(days), [hours, minutes, seconds]) if *minutes < 60 && *seconds < 60 => {
                days * 86400 + hours * 3600 + minutes * 60 + seconds
            }
            _ => return Err(error()),
        };
        if seconds == 0 {
            return Err(error());
        }
        Ok(Walltime::from_secs(seconds))
    }
}

impl fmt::Display for Walltime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.as_secs();
        write!(f, "{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(text: &str) -> u64 {
        text.parse::<Walltime>().unwrap().as_secs()
    }

    #[test]
    fn slurm_forms_parse() {
        assert_eq!(secs("90"), 5400);
        assert_eq!(secs("1:30"), 90);
        assert_eq!(secs("01:30:00"), 5400);
        assert_eq!(secs("2-0"), 172_800);
        assert_eq!(secs("1-02:03"), 93_780);
        assert_eq!(secs("1-02:03:04"), 93_784);
    }

    #[test]
    fn renders_as_hours_minutes_seconds() {
        assert_eq!("90".parse::<Walltime>().unwrap().to_string(), "01:30:00");
        assert_eq!(
            "2-00:00:01".parse::<Walltime>().unwrap().to_string(),
            "48:00:01"
        );
    }

    #[test]
    fn malformed_walltimes_are_refused_with_the_text() {
        for bad in [
            "", "abc", "1:2:3:4", "10:61", "1:60:00", "-5", "1h", "0", "00:00:00", "1-",
        ] {
            let error = bad.parse::<Walltime>().unwrap_err();
            assert!(
                error.to_string().contains(&format!("'{bad}'")),
                "{bad}: {error}"
            );
        }
    }
}
