fn main() -> anyhow::Result<()> {
    spiderpool_agent::Args::parse_and_run()
}
