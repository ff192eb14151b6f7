// The kstatus checker the tests run (hack/build-kstatus.sh builds it; the cache key is this version).
module novalet.local/kstatus

go 1.22.0

require sigs.k8s.io/cli-utils v0.37.2
