//! The `coordinator` chained CNI plugin (see the library's `coordinator` module).

fn main() -> std::process::ExitCode {
    spiderpool_cni::main_with(spiderpool_cni::coordinator::run)
}
