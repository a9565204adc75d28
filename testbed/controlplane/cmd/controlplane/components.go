package main

import (
	"context"
	"fmt"
	"net/url"
	"strconv"
	"time"

	"github.com/spf13/pflag"
	"go.etcd.io/etcd/server/v3/embed"
	utilerrors "k8s.io/apimachinery/pkg/util/errors"
	cliflag "k8s.io/component-base/cli/flag"
	basecompatibility "k8s.io/component-base/compatibility"
	logsapi "k8s.io/component-base/logs/api/v1"
	apiserverapp "k8s.io/kubernetes/cmd/kube-apiserver/app"
	apiserveroptions "k8s.io/kubernetes/cmd/kube-apiserver/app/options"
	cmapp "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	cmoptions "k8s.io/kubernetes/cmd/kube-controller-manager/app/options"
	schedapp "k8s.io/kubernetes/cmd/kube-scheduler/app"
	schedoptions "k8s.io/kubernetes/cmd/kube-scheduler/app/options"
)

// componentExit reports that an in-process component's Run returned.
type componentExit struct {
	name string
	err  error
}

func startEtcd(cp *controlPlane) (*embed.Etcd, error) {
	cfg := embed.NewConfig()
	cfg.Name = "testbed"
	cfg.Dir = cp.p.etcdData
	client, err := url.Parse(cp.etcdURL)
	if err != nil {
		return nil, err
	}
	peer, err := url.Parse(cp.etcdPeer)
	if err != nil {
		return nil, err
	}
	cfg.ListenClientUrls = []url.URL{*client}
	cfg.AdvertiseClientUrls = []url.URL{*client}
	cfg.ListenPeerUrls = []url.URL{*peer}
	cfg.AdvertisePeerUrls = []url.URL{*peer}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.LogOutputs = []string{cp.p.etcdLog}
	cfg.LogLevel = "warn"
	// NewConfig leaves this at 0, which logs every request as slow.
	cfg.WarningUnaryRequestDuration = embed.DefaultWarningUnaryRequestDuration
	cfg.UnsafeNoFsync = cp.s.unsafeNoFsync
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, err
	}
	select {
	case <-e.Server.ReadyNotify():
		return e, nil
	case err := <-e.Err():
		e.Close()
		return nil, err
	case <-time.After(60 * time.Second):
		e.Server.Stop()
		e.Close()
		return nil, fmt.Errorf("not ready within 60s (see %s)", cp.p.etcdLog)
	}
}

// parseInto parses args into a flag set holding every named set, as cobra would.
func parseInto(name string, sets cliflag.NamedFlagSets, args []string) error {
	fs := pflag.NewFlagSet(name, pflag.ContinueOnError)
	for _, n := range sets.Order {
		fs.AddFlagSet(sets.FlagSets[n])
	}
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("%s flags: %w", name, err)
	}
	return nil
}

// startAPIServer does what `kube-apiserver`'s cobra command does, minus its signal
// handler: this program owns the signals so it can stop the other components first.
func startAPIServer(ctx context.Context, cp *controlPlane, done chan<- error) error {
	admission := "ServiceAccount" // nothing would create the `default` ServiceAccount
	if cp.s.components == "all" {
		// Only the node-lifecycle controller (off here) removes the not-ready taint.
		admission = "TaintNodesByCondition"
	}
	args := []string{
		"--etcd-servers=" + cp.etcdURL,
		"--bind-address=" + cp.s.bindAddress.String(),
		"--advertise-address=" + cp.s.advertise.String(),
		"--secure-port=" + strconv.Itoa(cp.s.securePort),
		"--cert-dir=" + cp.p.dir,
		"--tls-cert-file=" + cp.p.servingCrt,
		"--tls-private-key-file=" + cp.p.servingKey,
		"--authorization-mode=RBAC",
		"--token-auth-file=" + cp.p.tokens,
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file=" + cp.p.saPub,
		"--service-account-signing-key-file=" + cp.p.saKey,
		"--service-cluster-ip-range=" + cp.s.serviceCIDR,
		"--enable-priority-and-fairness=false",
		"--endpoint-reconciler-type=none",
		// Bounds the HTTP server's shutdown at 2 s (instead of --request-timeout, 60 s)
		// when clients outside this process still hold watches open.
		"--shutdown-send-retry-after=true",
		"--disable-admission-plugins=" + admission,
		"--v=" + strconv.Itoa(cp.s.verbosity),
	}
	s := apiserveroptions.NewServerRunOptions()
	if err := parseInto("kube-apiserver", s.Flags(), args); err != nil {
		return err
	}
	if err := s.GenericServerRunOptions.ComponentGlobalsRegistry.Set(); err != nil {
		return err
	}
	featureGate := s.GenericServerRunOptions.ComponentGlobalsRegistry.FeatureGateFor(basecompatibility.DefaultKubeComponent)
	if err := logsapi.ValidateAndApply(s.Logs, featureGate); err != nil {
		return err
	}
	completed, err := s.Complete(ctx)
	if err != nil {
		return err
	}
	if errs := completed.Validate(); len(errs) != 0 {
		return utilerrors.NewAggregate(errs)
	}
	go func() { done <- apiserverapp.Run(ctx, completed) }()
	return nil
}

func startControllerManager(ctx context.Context, cp *controlPlane, done chan<- componentExit) error {
	s, err := cmoptions.NewKubeControllerManagerOptions()
	if err != nil {
		return err
	}
	args := []string{
		"--kubeconfig=" + cp.p.kubeconfig,
		"--leader-elect=false",
		"--secure-port=0",
		"--service-account-private-key-file=" + cp.p.saKey,
		"--root-ca-file=" + cp.p.caCrt,
		"--cluster-signing-cert-file=" + cp.p.caCrt,
		"--cluster-signing-key-file=" + cp.p.caKey,
		"--flex-volume-plugin-dir=" + cp.p.flexVolume,
		"--controllers=*,-node-lifecycle-controller",
	}
	sets := s.Flags(cmapp.KnownControllers(), cmapp.ControllersDisabledByDefault(), cmapp.ControllerAliases())
	s.ParsedFlags = &sets
	if err := parseInto("kube-controller-manager", sets, args); err != nil {
		return err
	}
	if err := s.ComponentGlobalsRegistry.Set(); err != nil {
		return err
	}
	c, err := s.Config(ctx, cmapp.KnownControllers(), cmapp.ControllersDisabledByDefault(), cmapp.ControllerAliases())
	if err != nil {
		return err
	}
	go func() {
		done <- componentExit{"kube-controller-manager", cmapp.Run(ctx, c.Complete())}
	}()
	return nil
}

// startScheduler calls Setup and Run directly: the scheduler's command installs a
// second signal handler, which panics in a process that already has one.
func startScheduler(ctx context.Context, cp *controlPlane, done chan<- componentExit) error {
	opts := schedoptions.NewOptions()
	args := []string{
		"--kubeconfig=" + cp.p.kubeconfig,
		"--leader-elect=false",
		"--secure-port=0",
	}
	if err := parseInto("kube-scheduler", *opts.Flags, args); err != nil {
		return err
	}
	if err := opts.ComponentGlobalsRegistry.Set(); err != nil {
		return err
	}
	cc, sched, err := schedapp.Setup(ctx, opts)
	if err != nil {
		return err
	}
	go func() {
		done <- componentExit{"kube-scheduler", schedapp.Run(ctx, cc, sched)}
	}()
	return nil
}
