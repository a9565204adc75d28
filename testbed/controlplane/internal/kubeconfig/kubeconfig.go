// Package kubeconfig writes token kubeconfigs with the CA embedded, the form kubectl,
// helm, client-go and kube-rs all read without extra files.
package kubeconfig

import (
	"fmt"

	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"raft-elector.io/testbed/controlplane/internal/pki"
)

// User is one context of a kubeconfig: a bearer token for one server.
type User struct {
	Context string
	Name    string
	Token   string
}

// Write stores a kubeconfig for server whose first user's context is the current one.
func Write(path, cluster, server string, caPEM []byte, users ...User) error {
	if len(users) == 0 {
		return fmt.Errorf("kubeconfig %s: no users", path)
	}
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters[cluster] = &clientcmdapi.Cluster{Server: server, CertificateAuthorityData: caPEM}
	for _, u := range users {
		cfg.AuthInfos[u.Name] = &clientcmdapi.AuthInfo{Token: u.Token}
		cfg.Contexts[u.Context] = &clientcmdapi.Context{Cluster: cluster, AuthInfo: u.Name, Namespace: "default"}
	}
	cfg.CurrentContext = users[0].Context
	data, err := clientcmd.Write(*cfg)
	if err != nil {
		return fmt.Errorf("kubeconfig %s: %w", path, err)
	}
	return pki.WriteFileAtomic(path, data, 0o600)
}

// Retarget reads the kubeconfig at src and writes one to dst that keeps the current
// context's credentials and CA but dials server instead.
func Retarget(src, dst, server string) error {
	cfg, err := clientcmd.LoadFromFile(src)
	if err != nil {
		return fmt.Errorf("read kubeconfig %s: %w", src, err)
	}
	ctx, ok := cfg.Contexts[cfg.CurrentContext]
	if !ok {
		return fmt.Errorf("kubeconfig %s: current context %q not found", src, cfg.CurrentContext)
	}
	cl, ok := cfg.Clusters[ctx.Cluster]
	if !ok {
		return fmt.Errorf("kubeconfig %s: cluster %q not found", src, ctx.Cluster)
	}
	cl.Server = server
	data, err := clientcmd.Write(*cfg)
	if err != nil {
		return fmt.Errorf("kubeconfig %s: %w", dst, err)
	}
	return pki.WriteFileAtomic(dst, data, 0o600)
}
