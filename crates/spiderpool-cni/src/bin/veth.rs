//! The `coordinator` chained CNI plugin under the name of upstream's older `veth` plugin, whose
//! network config keys (`service_cidr`) it accepts: the seed's NAD runs unchanged.

fn main() -> std::process::ExitCode {
    spiderpool_cni::main_with(spiderpool_cni::coordinator::run)
}
