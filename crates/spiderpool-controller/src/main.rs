fn main() -> anyhow::Result<()> {
    spiderpool_controller::Args::parse_and_run()
}
