// Command check loads the CDI specs of one directory with the CDI reference library (the registry a container
// runtime uses), then injects the named devices into an empty OCI spec, and prints the result as JSON:
//
//	check <spec-dir> <vendor/class=name>...
//
// Any spec error (parse, validation, conflict) or unresolvable device is reported and makes it exit 1.
package main

import (
	"encoding/json"
	"fmt"
	"os"

	"github.com/container-orchestrated-devices/container-device-interface/pkg/cdi"
	oci "github.com/opencontainers/runtime-spec/specs-go"
)

type node struct {
	Path  string `json:"path"`
	Type  string `json:"type"`
	Major int64  `json:"major"`
	Minor int64  `json:"minor"`
}

type mount struct {
	Destination string   `json:"destination"`
	Source      string   `json:"source"`
	Options     []string `json:"options"`
}

type result struct {
	Errors      []string `json:"errors"`
	Devices     []string `json:"devices"`
	Env         []string `json:"env"`
	DeviceNodes []node   `json:"deviceNodes"`
	Mounts      []mount  `json:"mounts"`
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: check <spec-dir> <vendor/class=name>...")
		os.Exit(2)
	}
	out := result{Errors: []string{}, Env: []string{}, DeviceNodes: []node{}, Mounts: []mount{}}
	cache, err := cdi.NewCache(cdi.WithSpecDirs(os.Args[1]), cdi.WithAutoRefresh(false))
	if err != nil {
		out.Errors = append(out.Errors, err.Error())
	}
	for path, errs := range cache.GetErrors() {
		for _, e := range errs {
			out.Errors = append(out.Errors, fmt.Sprintf("%s: %v", path, e))
		}
	}
	out.Devices = cache.ListDevices()
	spec := &oci.Spec{Process: &oci.Process{}, Linux: &oci.Linux{}}
	if unresolved, err := cache.InjectDevices(spec, os.Args[2:]...); err != nil {
		out.Errors = append(out.Errors, fmt.Sprintf("inject %v: %v", unresolved, err))
	}
	out.Env = append(out.Env, spec.Process.Env...)
	for _, d := range spec.Linux.Devices {
		out.DeviceNodes = append(out.DeviceNodes, node{d.Path, d.Type, d.Major, d.Minor})
	}
	for _, m := range spec.Mounts {
		out.Mounts = append(out.Mounts, mount{m.Destination, m.Source, m.Options})
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	_ = enc.Encode(out)
	if len(out.Errors) > 0 {
		os.Exit(1)
	}
}
