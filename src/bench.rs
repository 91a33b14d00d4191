//! `gitfleet bench`: figures on generated repositories (placeholder filled below).
#[derive(Clone, Debug, clap::Args)]
pub struct BenchArgs {}
pub fn run(_args: &BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
