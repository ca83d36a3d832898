{{/* Names ------------------------------------------------------------------ */}}

{{- define "csi-rbd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "csi-rbd.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "csi-rbd.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "csi-rbd.labels" -}}
helm.sh/chart: {{ include "csi-rbd.chart" . }}
app.kubernetes.io/name: {{ include "csi-rbd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: csi-rbd
{{- end -}}

{{/* Selector labels of one component: include with (list $ "controller"). */}}
{{- define "csi-rbd.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "csi-rbd.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "csi-rbd.controllerServiceAccount" -}}
{{- if .Values.serviceAccount.create -}}
{{- printf "%s-controller" (include "csi-rbd.fullname" .) -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.controllerName -}}
{{- end -}}
{{- end -}}

{{- define "csi-rbd.nodeServiceAccount" -}}
{{- if .Values.serviceAccount.create -}}
{{- printf "%s-node" (include "csi-rbd.fullname" .) -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.nodeName -}}
{{- end -}}
{{- end -}}

{{/* Images ----------------------------------------------------------------- */}}

{{- define "csi-rbd.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* --feature-gates=A=true,B=false from a map (sorted); nothing if empty. */}}
{{- define "csi-rbd.featureGates" -}}
{{- $gates := list -}}
{{- range $name, $on := . -}}
{{- $gates = append $gates (printf "%s=%t" $name $on) -}}
{{- end -}}
{{- if $gates -}}
- --feature-gates={{ join "," (sortAlpha $gates) }}
{{- end -}}
{{- end -}}

{{/* Engine-dependent choices ---------------------------------------------- */}}

{{- define "csi-rbd.native" -}}
{{- if eq .Values.engine "native" -}}true{{- end -}}
{{- end -}}

{{/* The csi-resizer runs (and StorageClasses allow expansion) when a resizer
     can reach every volume: Ceph, or a single-node native cluster. */}}
{{- define "csi-rbd.expansion" -}}
{{- if and .Values.sidecars.resizer.enabled (or (eq .Values.engine "ceph") .Values.native.singleNode) -}}true{{- end -}}
{{- end -}}

{{- define "csi-rbd.bindingMode" -}}
{{- if .Values.storageClasses.volumeBindingMode -}}
{{- .Values.storageClasses.volumeBindingMode -}}
{{- else if eq .Values.engine "native" -}}
WaitForFirstConsumer
{{- else -}}
Immediate
{{- end -}}
{{- end -}}

{{- define "csi-rbd.clusterID" -}}
{{- if eq .Values.engine "native" -}}
local
{{- else if .Values.ceph.clusterID -}}
{{- .Values.ceph.clusterID -}}
{{- else -}}
{{- (first .Values.ceph.clusters).id -}}
{{- end -}}
{{- end -}}

{{- define "csi-rbd.cephSecretName" -}}
{{- default (printf "%s-ceph" (include "csi-rbd.fullname" .)) .Values.ceph.secret.existingSecret -}}
{{- end -}}

{{/* The csi.storage.k8s.io/*-secret-* parameters (Ceph only), for the given roles. */}}
{{- define "csi-rbd.secretParameters" -}}
{{- $root := index . 0 -}}
{{- if eq $root.Values.engine "ceph" -}}
{{- range $role := index . 1 }}
csi.storage.k8s.io/{{ $role }}-secret-name: {{ include "csi-rbd.cephSecretName" $root | quote }}
csi.storage.k8s.io/{{ $role }}-secret-namespace: {{ $root.Release.Namespace | quote }}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Checks the schema cannot express, each with a message that says what to set. */}}
{{- define "csi-rbd.validate" -}}
{{- if eq .Values.engine "ceph" -}}
{{- if not .Values.ceph.clusters -}}
{{- fail "engine=ceph needs at least one cluster: set ceph.clusters (id, monitors, pool)" -}}
{{- end -}}
{{- $ids := list -}}
{{- range .Values.ceph.clusters -}}
{{- if has .id $ids -}}
{{- fail (printf "ceph.clusters: cluster id %q appears twice" .id) -}}
{{- end -}}
{{- $ids = append $ids .id -}}
{{- end -}}
{{- if and .Values.ceph.clusterID (not (has .Values.ceph.clusterID $ids)) -}}
{{- fail (printf "ceph.clusterID %q is not one of ceph.clusters (%s)" .Values.ceph.clusterID (join ", " $ids)) -}}
{{- end -}}
{{- if and (not .Values.ceph.secret.existingSecret) (or (not .Values.ceph.secret.userID) (not .Values.ceph.secret.userKey)) -}}
{{- fail "engine=ceph needs Ceph credentials: set ceph.secret.userID and ceph.secret.userKey, or ceph.secret.existingSecret" -}}
{{- end -}}
{{- end -}}
{{- if and .Values.kubevirt.storageProfile.enabled (not .Values.storageClasses.vm.enabled) -}}
{{- fail "kubevirt.storageProfile.enabled needs the VM StorageClass: set storageClasses.vm.enabled=true" -}}
{{- end -}}
{{- if and .Values.kubevirt.preference.enabled (not .Values.storageClasses.vm.enabled) -}}
{{- fail "kubevirt.preference.enabled takes its cache mode from the VM StorageClass: set storageClasses.vm.enabled=true" -}}
{{- end -}}
{{- end -}}
