{{/*
Containers shared by the controller Deployment and the node DaemonSet.
Each takes a dict: root (the chart's context), and where relevant
nodeDeployment (true: the sidecar runs on every node and serves only
that node's volumes; false: one active replica per cluster, leader-elected).
*/}}

{{- define "csi-rbd.sidecarSecurityContext" -}}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: ["ALL"]
{{- end -}}

{{- define "csi-rbd.nodeNameEnv" -}}
- name: NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
{{- end -}}

{{- define "csi-rbd.namespaceEnv" -}}
- name: NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- end -}}

{{- define "csi-rbd.leaderElectionArgs" -}}
- --leader-election=true
- --leader-election-namespace=$(NAMESPACE)
{{- end -}}

{{- define "csi-rbd.provisionerContainer" -}}
{{- $root := .root -}}
{{- $s := $root.Values.sidecars.provisioner -}}
{{- $gates := deepCopy $s.featureGates -}}
{{- if $root.Values.volumeAttributesClass.enabled -}}
{{- $_ := set $gates "VolumeAttributesClass" true -}}
{{- end -}}
- name: csi-provisioner
  image: {{ $s.image }}
  imagePullPolicy: {{ $root.Values.sidecars.pullPolicy }}
  args:
    - --csi-address=/csi/csi.sock
    - --v={{ $root.Values.sidecarLogLevel }}
    - --timeout={{ $s.timeout }}
    # PVC and PV names in CreateVolume's parameters (the driver annotates
    # the PVC <driverName>/storage.thick-provisioned when discard=ignore).
    - --extra-create-metadata=true
    - --default-fstype=ext4
    {{- with include "csi-rbd.featureGates" $gates }}{{ . | nindent 4 }}{{ end }}
    {{- if .nodeDeployment }}
    # Node-local volumes: each node provisions the PVCs scheduled on it.
    - --node-deployment=true
    - --strict-topology=true
    {{- else }}
    {{- include "csi-rbd.leaderElectionArgs" . | nindent 4 }}
    {{- end }}
    {{- with $s.extraArgs }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  env:
    {{- include "csi-rbd.namespaceEnv" . | nindent 4 }}
    {{- include "csi-rbd.nodeNameEnv" . | nindent 4 }}
  volumeMounts:
    - name: socket-dir
      mountPath: /csi
  {{- include "csi-rbd.sidecarSecurityContext" . | nindent 2 }}
  {{- with $s.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{- define "csi-rbd.snapshotterContainer" -}}
{{- $root := .root -}}
{{- $s := $root.Values.sidecars.snapshotter -}}
- name: csi-snapshotter
  image: {{ $s.image }}
  imagePullPolicy: {{ $root.Values.sidecars.pullPolicy }}
  args:
    - --csi-address=/csi/csi.sock
    - --v={{ $root.Values.sidecarLogLevel }}
    - --timeout={{ $s.timeout }}
    - --extra-create-metadata=true
    {{- if .nodeDeployment }}
    # Snapshots of node-local volumes are cut on their node (the cluster's
    # snapshot-controller needs --enable-distributed-snapshotting).
    - --node-deployment=true
    {{- else }}
    {{- include "csi-rbd.leaderElectionArgs" . | nindent 4 }}
    {{- end }}
    {{- with $s.extraArgs }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  env:
    {{- include "csi-rbd.namespaceEnv" . | nindent 4 }}
    {{- include "csi-rbd.nodeNameEnv" . | nindent 4 }}
  volumeMounts:
    - name: socket-dir
      mountPath: /csi
  {{- include "csi-rbd.sidecarSecurityContext" . | nindent 2 }}
  {{- with $s.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{- define "csi-rbd.resizerContainer" -}}
{{- $root := .root -}}
{{- $s := $root.Values.sidecars.resizer -}}
{{- $gates := deepCopy $s.featureGates -}}
{{- if $root.Values.volumeAttributesClass.enabled -}}
{{- $_ := set $gates "VolumeAttributesClass" true -}}
{{- end -}}
- name: csi-resizer
  image: {{ $s.image }}
  imagePullPolicy: {{ $root.Values.sidecars.pullPolicy }}
  args:
    - --csi-address=/csi/csi.sock
    - --v={{ $root.Values.sidecarLogLevel }}
    - --timeout={{ $s.timeout }}
    # Online expansion: never wait for pods to stop using the volume.
    - --handle-volume-inuse-error=false
    {{- include "csi-rbd.leaderElectionArgs" . | nindent 4 }}
    {{- with include "csi-rbd.featureGates" $gates }}{{ . | nindent 4 }}{{ end }}
    {{- with $s.extraArgs }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  env:
    {{- include "csi-rbd.namespaceEnv" . | nindent 4 }}
  volumeMounts:
    - name: socket-dir
      mountPath: /csi
  {{- include "csi-rbd.sidecarSecurityContext" . | nindent 2 }}
  {{- with $s.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{- define "csi-rbd.livenessprobeContainer" -}}
{{- $root := .root -}}
{{- $s := $root.Values.sidecars.livenessprobe -}}
- name: liveness-probe
  image: {{ $s.image }}
  imagePullPolicy: {{ $root.Values.sidecars.pullPolicy }}
  args:
    # Serves /healthz on healthPort by calling Probe on the CSI socket; the
    # kubelet's liveness probe of the driver container asks it.
    - --csi-address=/csi/csi.sock
    - --health-port={{ $root.Values.healthPort }}
    - --probe-timeout=5s
    - --v={{ $root.Values.sidecarLogLevel }}
  volumeMounts:
    - name: socket-dir
      mountPath: /csi
  {{- include "csi-rbd.sidecarSecurityContext" . | nindent 2 }}
  {{- with $s.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/* The driver container: dict root, mode (controller|node|all). */}}
{{- define "csi-rbd.driverContainer" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $onNode := ne .mode "controller" -}}
- name: csi-rbd
  image: {{ include "csi-rbd.image" $root }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  args:
    - --endpoint=unix:///csi/csi.sock
    - --node-id=$(NODE_NAME)
    - --mode={{ .mode }}
    - --driver-name={{ $v.driverName }}
    - --log-level={{ $v.logLevel }}
    {{- if eq $v.engine "ceph" }}
    - --config=/etc/csi-rbd/clusters.yaml
    {{- end }}
    {{- if $onNode }}
    - --state-dir=/var/lib/csi-rbd/node
    - --allowed-root={{ $v.kubeletDir }}
    - --max-volumes-per-node={{ $v.node.maxVolumesPerNode }}
    {{- end }}
    {{- if $v.metrics.enabled }}
    - --metrics-address=:{{ $v.metrics.port }}
    {{- end }}
  env:
    {{- include "csi-rbd.nodeNameEnv" . | nindent 4 }}
    - name: CSI_RBD_DATA_DIR
      value: /var/lib/csi-rbd
  ports:
    - name: healthz
      containerPort: {{ $v.healthPort }}
      protocol: TCP
    {{- if $v.metrics.enabled }}
    - name: metrics
      containerPort: {{ $v.metrics.port }}
      protocol: TCP
    {{- end }}
  # Liveness: the livenessprobe sidecar calls Probe on the CSI socket.
  livenessProbe:
    httpGet:
      path: /healthz
      port: healthz
    initialDelaySeconds: 10
    periodSeconds: 10
    timeoutSeconds: 5
    failureThreshold: 5
  {{- if $v.metrics.enabled }}
  # Readiness: the driver's own /healthz (200 once every engine answers).
  readinessProbe:
    httpGet:
      path: /healthz
      port: metrics
    periodSeconds: 10
    timeoutSeconds: 5
    failureThreshold: 3
  {{- end }}
  volumeMounts:
    - name: socket-dir
      mountPath: /csi
    {{- if eq $v.engine "ceph" }}
    - name: ceph-config
      mountPath: /etc/csi-rbd
      readOnly: true
    {{- end }}
    {{- if $onNode }}
    - name: kubelet-dir
      mountPath: {{ $v.kubeletDir }}
      mountPropagation: Bidirectional
    - name: data-dir
      mountPath: /var/lib/csi-rbd
      mountPropagation: Bidirectional
    - name: dev
      mountPath: /dev
    - name: sys
      mountPath: /sys
    {{- else }}
    - name: data-dir
      mountPath: /var/lib/csi-rbd
    - name: tmp
      mountPath: /tmp
    {{- end }}
  {{- if $onNode }}
  # Mounts, loop devices and FUSE need root and privilege; the image's
  # default user (10001) is for the controller.
  securityContext:
    privileged: true
    runAsUser: 0
    runAsGroup: 0
    runAsNonRoot: false
    allowPrivilegeEscalation: true
    readOnlyRootFilesystem: false
  {{- else }}
  securityContext:
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
    runAsNonRoot: true
    capabilities:
      drop: ["ALL"]
  {{- end }}
  {{- with (ternary $v.node.resources $v.controller.resources $onNode) }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
