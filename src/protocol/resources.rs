//! Abstract resources (Dask's `resources=`): what a worker has, as `GPU=2,MEM=8e9` on its
//! command line, and what a task needs of it while it runs.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Amounts by name, each name once, sorted by name.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Resources(Vec<(String, f64)>);

impl Resources {
    /// Nothing: what a task that asks for no resources holds.
    pub const NONE: Resources = Resources(Vec::new());

    /// From (name, amount) pairs; a name given twice keeps its last amount.
    pub fn new(pairs: impl IntoIterator<Item = (String, f64)>) -> Resources {
        let mut amounts: Vec<(String, f64)> = Vec::new();
        for (name, amount) in pairs {
            match amounts.iter_mut().find(|(n, _)| *n == name) {
                Some(entry) => entry.1 = amount,
                None => amounts.push((name, amount)),
            }
        }
        amounts.sort_by(|a, b| a.0.cmp(&b.0));
        Resources(amounts)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn get(&self, name: &str) -> f64 {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0.0, |(_, amount)| *amount)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, f64)> {
        self.0.iter().map(|(name, amount)| (name.as_str(), *amount))
    }

    /// Whether `need` fits in these amounts once `used` of them is taken.
    pub fn fits(&self, used: &Resources, need: &Resources) -> bool {
        need.iter()
            .all(|(name, amount)| self.get(name) - used.get(name) >= amount)
    }

    /// Adds `other` (subtracts it with `sign` -1), dropping names that reach zero.
    pub fn add(&mut self, other: &Resources, sign: f64) {
        let sum = self
            .0
            .iter()
            .map(|(name, amount)| (name.clone(), amount + sign * other.get(name)))
            .chain(
                other
                    .iter()
                    .filter(|(name, _)| self.get(name) == 0.0)
                    .map(|(name, amount)| (name.to_string(), sign * amount)),
            )
            .filter(|(_, amount)| amount.abs() > 1e-9);
        *self = Resources::new(sum.collect::<Vec<_>>());
    }
}

impl fmt::Display for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pairs: Vec<String> = self.iter().map(|(n, a)| format!("{n}={a}")).collect();
        write!(f, "{}", pairs.join(","))
    }
}

impl FromStr for Resources {
    type Err = String;

    /// `GPU=2,MEM=8e9` (spaces allowed, as dask-worker's `--resources "GPU=2 MEM=8e9"`).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut pairs = Vec::new();
        for item in text.split([',', ' ']).filter(|item| !item.is_empty()) {
            let (name, amount) = item
                .split_once('=')
                .ok_or_else(|| format!("{item:?}: expected NAME=AMOUNT, as GPU=2"))?;
            let amount: f64 = amount
                .parse()
                .map_err(|_| format!("{item:?}: {amount:?} is not a number"))?;
            if name.is_empty() || !amount.is_finite() || amount < 0.0 {
                return Err(format!("{item:?}: a name and an amount of 0 or more"));
            }
            pairs.push((name.to_string(), amount));
        }
        Ok(Resources::new(pairs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_people_write_and_refuses_the_rest() {
        let r: Resources = "GPU=2, MEM=8e9".parse().expect("valid");
        assert_eq!(r.get("GPU"), 2.0);
        assert_eq!(r.get("MEM"), 8e9);
        assert_eq!(r.to_string(), "GPU=2,MEM=8000000000");
        for bad in ["GPU", "GPU=two", "=1", "GPU=-1", "GPU=inf"] {
            assert!(bad.parse::<Resources>().is_err(), "{bad}");
        }
        assert!("".parse::<Resources>().expect("empty").is_empty());
    }

    #[test]
    fn fits_and_adds() {
        let worker: Resources = "GPU=2,MEM=10".parse().expect("valid");
        let task: Resources = "GPU=1,MEM=6".parse().expect("valid");
        let mut used = Resources::default();
        assert!(worker.fits(&used, &task));
        used.add(&task, 1.0);
        assert!(!worker.fits(&used, &task), "MEM 6 + 6 > 10");
        used.add(&task, -1.0);
        assert!(used.is_empty());
        assert!(!worker.fits(&used, &"TPU=1".parse().expect("valid")));
    }
}
