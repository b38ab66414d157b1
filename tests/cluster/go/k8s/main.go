// Command selftrain-k8s is a tiny multi-call binary (hyperkube style) used only
// by tests/cluster: one link step gives the Kubernetes control plane pieces and
// etcd used by the local test cluster.
//
//	selftrain-k8s apiserver [flags]           -> kube-apiserver
//	selftrain-k8s scheduler [flags]           -> kube-scheduler
//	selftrain-k8s controller-manager [flags]  -> kube-controller-manager
//	selftrain-k8s etcd [flags]                -> etcd
package main

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"
	"go.etcd.io/etcd/server/v3/etcdmain"
	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
)

func usage() {
	fmt.Fprintf(os.Stderr, "usage: %s apiserver|scheduler|controller-manager|etcd [flags]\n", filepath.Base(os.Args[0]))
	os.Exit(2)
}

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	sub := os.Args[1]
	var cmd *cobra.Command
	switch sub {
	case "apiserver", "kube-apiserver":
		cmd = apiserver.NewAPIServerCommand()
	case "scheduler", "kube-scheduler":
		cmd = scheduler.NewSchedulerCommand()
	case "controller-manager", "kube-controller-manager":
		cmd = controllermanager.NewControllerManagerCommand()
	case "etcd":
		etcdmain.Main(append([]string{"etcd"}, os.Args[2:]...))
		return
	default:
		usage()
	}
	cmd.SetArgs(os.Args[2:])
	os.Exit(cli.Run(cmd))
}
