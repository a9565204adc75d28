// Command leasebaseline is the comparison point for raft-elector's failover benchmark:
// client-go's own tools/leaderelection with a Lease lock and its usual timings, one
// process per replica. When it starts leading it labels its own pod
// raft-elector.io/role=leader and prints `leading <unix-nanos>` and, once the label is
// written, `labelled <unix-nanos>` on stdout.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
)

const leaderLabelPatch = `{"metadata":{"labels":{"raft-elector.io/role":"leader"}}}`

func main() {
	os.Exit(run())
}

func run() int {
	fs := flag.NewFlagSet("leasebaseline", flag.ContinueOnError)
	fs.SetOutput(os.Stdout)
	id := fs.String("id", "", "this replica's identity in the Lease (required)")
	namespace := fs.String("namespace", "default", "namespace of the Lease and the pod")
	leaseName := fs.String("lease-name", "leasebaseline", "name of the Lease")
	kubeconfigPath := fs.String("kubeconfig", "", "kubeconfig; empty uses in-cluster config")
	podName := fs.String("pod-name", "", "pod to label raft-elector.io/role=leader on leading; empty labels nothing")
	leaseDuration := fs.Duration("lease-duration", 15*time.Second, "LeaseDuration (client-go's usual default)")
	renewDeadline := fs.Duration("renew-deadline", 10*time.Second, "RenewDeadline")
	retryPeriod := fs.Duration("retry-period", 2*time.Second, "RetryPeriod")
	release := fs.Bool("release-on-cancel", false, "give the Lease up on SIGTERM (client-go's default is false)")
	if err := fs.Parse(os.Args[1:]); err != nil {
		return 2
	}
	if *id == "" {
		fmt.Println("leasebaseline: --id is required")
		return 2
	}
	if !(*leaseDuration > *renewDeadline && *renewDeadline > *retryPeriod && *retryPeriod > 0) {
		fmt.Println("leasebaseline: need lease-duration > renew-deadline > retry-period > 0")
		return 2
	}
	var cfg *rest.Config
	var err error
	if *kubeconfigPath != "" {
		cfg, err = clientcmd.BuildConfigFromFlags("", *kubeconfigPath)
	} else {
		cfg, err = rest.InClusterConfig()
	}
	if err != nil {
		fmt.Printf("leasebaseline: client config: %v\n", err)
		return 1
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		fmt.Printf("leasebaseline: client: %v\n", err)
		return 1
	}

	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer cancel()

	lock := &resourcelock.LeaseLock{
		LeaseMeta:  metav1.ObjectMeta{Namespace: *namespace, Name: *leaseName},
		Client:     client.CoordinationV1(),
		LockConfig: resourcelock.ResourceLockConfig{Identity: *id},
	}
	elector, err := leaderelection.NewLeaderElector(leaderelection.LeaderElectionConfig{
		Lock:            lock,
		LeaseDuration:   *leaseDuration,
		RenewDeadline:   *renewDeadline,
		RetryPeriod:     *retryPeriod,
		ReleaseOnCancel: *release,
		Name:            *leaseName,
		Callbacks: leaderelection.LeaderCallbacks{
			OnStartedLeading: func(ctx context.Context) {
				fmt.Printf("leading %d\n", time.Now().UnixNano())
				if *podName == "" {
					return
				}
				labelPod(ctx, client, *namespace, *podName)
			},
			OnStoppedLeading: func() {
				fmt.Printf("stopped %d\n", time.Now().UnixNano())
			},
			OnNewLeader: func(identity string) {
				fmt.Printf("leader %s %d\n", identity, time.Now().UnixNano())
			},
		},
	})
	if err != nil {
		fmt.Printf("leasebaseline: %v\n", err)
		return 2
	}
	elector.Run(ctx)
	return 0
}

// labelPod retries the label patch with back-off until it succeeds or leadership ends.
func labelPod(ctx context.Context, client kubernetes.Interface, namespace, pod string) {
	backoff := 50 * time.Millisecond
	for {
		_, err := client.CoreV1().Pods(namespace).Patch(ctx, pod, types.MergePatchType,
			[]byte(leaderLabelPatch), metav1.PatchOptions{})
		if err == nil {
			fmt.Printf("labelled %d\n", time.Now().UnixNano())
			return
		}
		fmt.Printf("label %s/%s: %v\n", namespace, pod, err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		if backoff < 2*time.Second {
			backoff *= 2
		}
	}
}
