// Command kubelet is the test bed's process kubelet: it registers one Ready
// Node, renews its Lease, and runs every pod bound to it as plain processes,
// each pod in its own network namespace on a bridge.
//
//	API server ──watch pods (spec.nodeName=NODE)──► podWorker (one per pod UID)
//	                                                 ├─ sandbox: netns + veth + IP + /etc/netns/<ns>/resolv.conf
//	                                                 ├─ volumes: emptyDir, secret, configMap, projected (SA token), downwardAPI
//	                                                 ├─ containers: `ip netns exec <ns> kubelet pod-exec …` → the mapped binary
//	                                                 ├─ probes: HTTP / TCP / exec → ready, restarts
//	                                                 └─ status ──PATCH pods/status──► API server
//
// A second mode, `kubelet pod-exec`, runs inside `ip netns exec` (which has
// already unshared the mount namespace and mounted /etc/netns/<ns>/* over
// /etc): it bind-mounts the pod's volumes at their mount paths, sets the pod's
// hostname in a new UTS namespace and executes the container's command.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"
)

// config is everything the kubelet is told on its command line.
type config struct {
	kubeconfig      string
	nodeName        string
	dir             string
	bridge          string
	bridgeIP        net.IP
	podNet          *net.IPNet
	dnsIP           string
	clusterDomain   string
	apiHost         string
	apiPort         string
	raftElectorBin  string
	restartBackoff  time.Duration
	maxRestartDelay time.Duration
	self            string
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == "pod-exec" {
		os.Exit(podExec(os.Args[2:]))
	}
	var cfg config
	var bridgeIP, podCIDR string
	flag.StringVar(&cfg.kubeconfig, "kubeconfig", "", "kubeconfig of the API server (admin)")
	flag.StringVar(&cfg.nodeName, "node-name", "testbed", "name of the Node to register")
	flag.StringVar(&cfg.dir, "dir", "", "bed directory: logs/ and pods/ go there")
	flag.StringVar(&cfg.bridge, "bridge", "rebr0", "bridge the pod veths join (at most 6 characters: it prefixes netns and veth names)")
	flag.StringVar(&bridgeIP, "bridge-ip", "10.244.0.1", "the bridge's address: pods' default route and the Node's InternalIP")
	flag.StringVar(&podCIDR, "pod-cidr", "10.244.0.0/24", "pod addresses are taken from this network")
	flag.StringVar(&cfg.dnsIP, "dns-ip", "", "cluster DNS server pods resolve with [default: --bridge-ip]")
	flag.StringVar(&cfg.clusterDomain, "cluster-domain", "cluster.local", "cluster DNS domain")
	flag.StringVar(&cfg.apiHost, "apiserver-host", "", "KUBERNETES_SERVICE_HOST given to pods [default: --bridge-ip]")
	flag.StringVar(&cfg.apiPort, "apiserver-port", "6443", "KUBERNETES_SERVICE_PORT given to pods")
	flag.StringVar(&cfg.raftElectorBin, "raft-elector-bin", os.Getenv("RAFT_ELECTOR_TESTBED_BIN"), "binary that images named raft-elector map to")
	flag.DurationVar(&cfg.restartBackoff, "restart-backoff", time.Second, "first container restart delay (doubles per crash; the real kubelet uses 10s)")
	flag.DurationVar(&cfg.maxRestartDelay, "max-restart-backoff", 30*time.Second, "longest container restart delay (the real kubelet uses 5m)")
	klog.InitFlags(nil)
	flag.Parse()

	if cfg.kubeconfig == "" || cfg.dir == "" {
		fmt.Fprintln(os.Stderr, "kubelet: --kubeconfig and --dir are required")
		os.Exit(2)
	}
	if len(cfg.bridge) > 6 {
		fmt.Fprintf(os.Stderr, "kubelet: --bridge %q is longer than 6 characters; veth names would exceed 15\n", cfg.bridge)
		os.Exit(2)
	}
	cfg.bridgeIP = net.ParseIP(bridgeIP).To4()
	if cfg.bridgeIP == nil {
		fmt.Fprintf(os.Stderr, "kubelet: --bridge-ip %q is not an IPv4 address\n", bridgeIP)
		os.Exit(2)
	}
	_, podNet, err := net.ParseCIDR(podCIDR)
	if err != nil || podNet.IP.To4() == nil {
		fmt.Fprintf(os.Stderr, "kubelet: --pod-cidr %q is not an IPv4 CIDR\n", podCIDR)
		os.Exit(2)
	}
	cfg.podNet = podNet
	if cfg.dnsIP == "" {
		cfg.dnsIP = cfg.bridgeIP.String()
	}
	if cfg.apiHost == "" {
		cfg.apiHost = cfg.bridgeIP.String()
	}
	if cfg.self, err = os.Executable(); err != nil {
		klog.Fatalf("cannot find my own executable: %v", err)
	}
	if cfg.dir, err = filepath.Abs(cfg.dir); err != nil {
		klog.Fatalf("bad --dir: %v", err)
	}
	for _, d := range []string{"logs", "pods"} {
		if err := os.MkdirAll(filepath.Join(cfg.dir, d), 0o755); err != nil {
			klog.Fatalf("cannot create %s: %v", d, err)
		}
	}

	restCfg, err := clientcmd.BuildConfigFromFlags("", cfg.kubeconfig)
	if err != nil {
		klog.Fatalf("cannot load --kubeconfig %s: %v", cfg.kubeconfig, err)
	}
	restCfg.QPS = 200
	restCfg.Burst = 400
	restCfg.UserAgent = "testbed-kubelet"
	client, err := kubernetes.NewForConfig(restCfg)
	if err != nil {
		klog.Fatalf("cannot build a client: %v", err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		sig := <-signals
		klog.Infof("got %v: stopping every pod", sig)
		cancel()
	}()

	k := newKubelet(cfg, client)
	if err := k.run(ctx); err != nil {
		klog.Errorf("kubelet: %v", err)
		os.Exit(1)
	}
	klog.Info("kubelet: stopped")
}
