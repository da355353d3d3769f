//! `esl-agent demo` (placeholder while the demo is written).
#[derive(clap::Args, Debug, Clone)]
pub struct DemoOptions {
    #[arg(long)]
    pub verbose: bool,
}
pub async fn run(_o: DemoOptions) -> anyhow::Result<()> {
    anyhow::bail!("demo not built yet")
}
