// kstatus reads one Kubernetes object as JSON on stdin and prints kstatus's verdict on it,
// {"status": "InProgress|Current|Failed|Terminating|...", "message": "..."}: the generic rules
// of sigs.k8s.io/cli-utils/pkg/kstatus/status (Flux, kpt, Config Sync) run on the real object.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utiljson "k8s.io/apimachinery/pkg/util/json"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

func main() {
	// apimachinery's decoder, not encoding/json's: integers stay int64, as kstatus reads
	// metadata.generation and status.observedGeneration (a float64 there is an error)
	var object map[string]interface{}
	data, err := io.ReadAll(os.Stdin)
	if err == nil {
		err = utiljson.Unmarshal(data, &object)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "kstatus: reading the object:", err)
		os.Exit(2)
	}
	result, err := status.Compute(&unstructured.Unstructured{Object: object})
	if err != nil {
		fmt.Fprintln(os.Stderr, "kstatus:", err)
		os.Exit(1)
	}
	_ = json.NewEncoder(os.Stdout).Encode(map[string]string{"status": string(result.Status), "message": result.Message})
}
