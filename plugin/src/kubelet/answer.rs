//! The one conversion of a container's answer ([`ContainerAnswer`], built by [`crate::container`]) into the
//! kubelet's protobuf `ContainerAllocateResponse`, and of its device nodes into `DeviceSpec`s; and the
//! kubelet's `GetPreferredAllocation` request as the hand-off reads it.
//!
//! The kubelet API carries paths as strings; a non-UTF-8 host path (which no setting of ours produces) is
//! passed on lossily rather than failing the allocation.

use kubelet_api::v1beta1::{
    CdiDevice, ContainerAllocateResponse, ContainerPreferredAllocationRequest, DeviceSpec, Mount,
};

use crate::container::device_nodes::DeviceNode;
use crate::container::response::{ContainerAnswer, ContainerMount};
use crate::handoff::allocator::PreferredRequest;

/// The hand-off's view of one container's `GetPreferredAllocation` request.
pub fn preferred_request(request: &ContainerPreferredAllocationRequest) -> PreferredRequest<'_> {
    PreferredRequest {
        available_device_i_ds: &request.available_device_i_ds,
        must_include_device_i_ds: &request.must_include_device_i_ds,
        allocation_size: request.allocation_size,
    }
}

/// The kubelet's message for one container's answer.
pub fn container_response(answer: ContainerAnswer) -> ContainerAllocateResponse {
    let ContainerAnswer {
        envs,
        mounts,
        devices,
        cdi_devices,
        annotations,
    } = answer;
    ContainerAllocateResponse {
        envs: envs.into_iter().collect(),
        mounts: mounts.into_iter().map(mount).collect(),
        devices: devices.into_iter().map(device_spec).collect(),
        annotations: annotations.into_iter().collect(),
        cdi_devices: cdi_devices
            .into_iter()
            .map(|name| CdiDevice { name })
            .collect(),
    }
}

fn mount(mount: ContainerMount) -> Mount {
    Mount {
        container_path: mount.container_path,
        host_path: mount.host_path.to_string_lossy().into_owned(),
        read_only: mount.read_only,
    }
}

/// A device node as the kubelet hands it to the runtime: `rw`, the Go plugin's permissions.
pub fn device_spec(node: DeviceNode) -> DeviceSpec {
    DeviceSpec {
        container_path: node.container_path,
        host_path: node.host_path.to_string_lossy().into_owned(),
        permissions: "rw".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn every_field_of_the_answer_reaches_the_kubelet_s_message() {
        let answer = ContainerAnswer {
            envs: [("NVIDIA_VISIBLE_DEVICES".to_owned(), "GPU-a".to_owned())].into(),
            mounts: vec![ContainerMount {
                container_path: "/tmp/vgpu".to_owned(),
                host_path: PathBuf::from("/var/vgpu/uid_cuda"),
                read_only: false,
            }],
            devices: vec![DeviceNode {
                container_path: "/dev/nvidia3".to_owned(),
                host_path: PathBuf::from("/host/dev/nvidia3"),
            }],
            cdi_devices: vec!["volcano.sh/vgpu=GPU-a".to_owned()],
            annotations: [(
                "cdi.k8s.io/x".to_owned(),
                "volcano.sh/vgpu=GPU-a".to_owned(),
            )]
            .into(),
        };
        let response = container_response(answer);
        assert_eq!(response.envs["NVIDIA_VISIBLE_DEVICES"], "GPU-a");
        assert_eq!(
            response.mounts,
            vec![Mount {
                container_path: "/tmp/vgpu".to_owned(),
                host_path: "/var/vgpu/uid_cuda".to_owned(),
                read_only: false,
            }]
        );
        assert_eq!(
            response.devices,
            vec![DeviceSpec {
                container_path: "/dev/nvidia3".to_owned(),
                host_path: "/host/dev/nvidia3".to_owned(),
                permissions: "rw".to_owned(),
            }]
        );
        assert_eq!(
            response.cdi_devices,
            vec![CdiDevice {
                name: "volcano.sh/vgpu=GPU-a".to_owned()
            }]
        );
        assert_eq!(
            response.annotations["cdi.k8s.io/x"],
            "volcano.sh/vgpu=GPU-a"
        );
    }
}
