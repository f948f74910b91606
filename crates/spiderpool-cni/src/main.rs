//! The `spiderpool` binary: stdin and the environment in, the plugin's answer or CNI error JSON
//! out (see the library for the protocol).

fn main() -> std::process::ExitCode {
    spiderpool_cni::main_with(spiderpool_cni::plugin::run)
}
